class ExportError(Exception):
    """The model or the arguments cannot be exported; the message names the module or argument."""

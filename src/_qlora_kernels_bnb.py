"""qlora-kernels' ``bitsandbytes.backends`` entry point, kept outside the package on purpose:
bitsandbytes turns an exception raised while loading an entry point into a failed
``import bitsandbytes``, and importing ``qlora_kernels`` itself can fail (a bad
QLORA_KERNELS_* value, a broken or mixed install). Nothing here can: a failure is logged
once and bitsandbytes keeps its own kernels (qlora_kernels/integrations/bitsandbytes.py)."""
import logging


def load() -> None:
    try:
        from qlora_kernels.integrations.bitsandbytes import load as load_plugin
    except Exception as e:  # noqa: BLE001 - bitsandbytes must import whatever happens here
        logging.getLogger("qlora_kernels.integrations.bitsandbytes").warning(
            "qlora-kernels: the bitsandbytes plugin did not load (%s: %s); bitsandbytes keeps its own kernels",
            type(e).__name__, e)
        return
    load_plugin()

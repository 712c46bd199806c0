"""Installs the PEFT dispatcher when PEFT is importable, without importing PEFT (and
with it transformers) when it is not installed."""
import importlib.util


def install_peft_dispatch() -> bool:
    if importlib.util.find_spec("peft") is None:
        return False
    from .peft import install

    install()
    return True

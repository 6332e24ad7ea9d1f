"""tdcompile: a torch.compile backend ("tdist") that fuses tensor-parallel communication
into the GEMMs around it.

    import tdcompile                                   # optional: the entry point registers it too
    compiled = torch.compile(model, backend="tdist", options={"strategy": "auto"})
    report = tdcompile.explain(model, input_ids)       # what matched, where, shapes, candidate us, why
"""
from tdcompile.backend import register as _register, tdist_backend
from tdcompile.config import Options
from tdcompile.explain import explain
from tdcompile.report import Report

_register()

__all__ = ["tdist_backend", "explain", "Options", "Report"]
__version__ = "0.1.0"

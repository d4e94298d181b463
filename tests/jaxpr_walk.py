"""Walking traced programs: every equation of a jaxpr, sub-programs included."""

from jax.extend.core import ClosedJaxpr, Jaxpr


def all_eqns(jaxpr):
    """Every equation of a (closed) jaxpr, recursing into scan/jit/remat/custom-rule bodies."""
    if isinstance(jaxpr, ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, (Jaxpr, ClosedJaxpr)):
                    yield from all_eqns(sub)

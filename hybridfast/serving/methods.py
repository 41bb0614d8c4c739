"""The generation methods a request selects (``method``) and the settings that decide its tokens.

==================  ===================================================  ====================================
method              runs                                                 settings
==================  ===================================================  ====================================
``plain``           ``Engine`` decoding, continuous batching              temperature, top_k
``hybrid-paper``    ``HybridModel`` paper mode, continuous batching        (greedy, as in the paper)
``hybrid-routed``   ``HybridModel`` routed mode, continuous batching       temperature, top_k, threshold
``power-mh``        ``PowerSampler(method="mh")``, one job at a time       alpha, block_size, n_mcmc, top_k, seed
``power-smc``       ``PowerSampler(method="smc")``, one job at a time      alpha, n_particles, ess_threshold,
                                                                         alpha_ramp, top_k, seed
``power-scalable``  ``PowerSampler(method="scalable")``, one job at a      alpha, block_size, variant,
                    time                                                 n_candidates, n_rollouts, horizon,
                                                                         n_proposals, jackknife, seed
==================  ===================================================  ====================================

A request that gives a setting its method does not take is refused, naming the setting. Ranges
are checked here; what depends on several settings (e.g. scalable's n_candidates <= n_proposals)
is checked by ``PowerSampler``, whose message names the settings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import RequestError

__all__ = ["BATCHED", "HYBRID", "POWER", "METHODS", "PARAMS", "Settings", "settings_of"]

BATCHED = ("plain", "hybrid-paper", "hybrid-routed")      #: run through a continuous-batching Scheduler
HYBRID = ("hybrid-paper", "hybrid-routed")                #: need a thinking model and steering artifacts
POWER = {"power-mh": "mh", "power-smc": "smc", "power-scalable": "scalable"}   #: method -> PowerSampler(method=)
METHODS = BATCHED + tuple(POWER)

_SAMPLED = ("plain", "hybrid-routed")                     #: take temperature and top_k
_ANY = (lambda v: True, "")
_AT_LEAST_1, _AT_LEAST_0 = (lambda v: v >= 1, ">= 1"), (lambda v: v >= 0, ">= 0")
#: method setting -> (type, (test, what it requires), methods that take it)
PARAMS = {
    "top_k": (int, _AT_LEAST_1, _SAMPLED + ("power-mh", "power-smc")),
    "threshold": (float, _ANY, ("hybrid-routed",)),
    "alpha": (float, _AT_LEAST_1, tuple(POWER)),
    "block_size": (int, _AT_LEAST_1, ("power-mh", "power-scalable")),
    "n_mcmc": (int, _AT_LEAST_0, ("power-mh",)),
    "n_particles": (int, _AT_LEAST_1, ("power-smc",)),
    "ess_threshold": (float, (lambda v: 0 < v <= 1, "in (0, 1]"), ("power-smc",)),
    "alpha_ramp": (int, _AT_LEAST_0, ("power-smc",)),
    "variant": (str, (lambda v: v in ("token", "block"), "'token' or 'block'"), ("power-scalable",)),
    "n_candidates": (int, _AT_LEAST_1, ("power-scalable",)),
    "n_rollouts": (int, _AT_LEAST_1, ("power-scalable",)),
    "horizon": (int, _AT_LEAST_1, ("power-scalable",)),
    "n_proposals": (int, _AT_LEAST_1, ("power-scalable",)),
    "jackknife": (bool, _ANY, ("power-scalable",)),
}
_BATCHED_PARAMS = ("top_k", "threshold")        #: the others are PowerSampler settings


@dataclass(frozen=True)
class Settings:
    """A request's method and every setting that decides its tokens (``None``: the default)."""
    method: str
    temperature: float = 0.0
    top_k: int | None = None
    threshold: float | None = None
    power: tuple = ()              #: PowerSampler settings as sorted ``(name, value)`` pairs
    seed: int | None = None

    @property
    def batched(self) -> bool:
        return self.method in BATCHED

    @property
    def scheduler_key(self) -> tuple:
        """Requests with equal keys share one scheduler (one sampling setting per scheduler)."""
        return self.method, self.temperature, self.top_k, self.threshold

    def power_kwargs(self) -> dict:
        """``PowerSampler`` keyword arguments (power methods)."""
        return dict(self.power, method=POWER[self.method], top_k=self.top_k)


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _value(name: str, value, kind: type, rule=_ANY):
    """``value`` as ``kind`` (numbers finite), passing ``rule``; a :class:`RequestError` naming
    ``name`` otherwise."""
    if kind in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (kind is float or float(value).is_integer())
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise RequestError(400, f"{name} must be {_KINDS[kind]}{' (finite)' if kind is float else ''}, "
                                f"got {value!r}", param=name)
    value = kind(value)
    test, requirement = rule
    if not test(value):
        raise RequestError(400, f"{name} must be {requirement}, got {value!r}", param=name)
    return value


def _temperature(method: str, given, default: float) -> float:
    if method in POWER:
        if given is not None:
            raise RequestError(400, f"temperature is not a setting of {method}: it samples p^alpha with "
                                    f"proposals at temperature 1/alpha (got {given}); omit it", param="temperature")
        return 0.0
    if method == "hybrid-paper":
        if given not in (None, 0):
            raise RequestError(400, f"hybrid-paper is greedy (temperature 0), as in the paper; got temperature "
                                    f"{given}", param="temperature")
        return 0.0
    return _value("temperature", default if given is None else given, float, (lambda v: v >= 0, ">= 0"))


def settings_of(given: dict, *, available, default_temperature: float = 1.0) -> Settings:
    """The :class:`Settings` of a request's fields ``given`` (``method``, ``temperature``,
    ``seed`` and :data:`PARAMS`; ``None`` = not given) on a server offering the methods
    ``available``. ``default_temperature``: the temperature of plain and hybrid-routed requests
    that give none (OpenAI's default is 1)."""
    method = given.get("method") or "plain"
    if method not in METHODS:
        raise RequestError(400, f"unknown method {method!r}; choose from {', '.join(METHODS)}", param="method",
                           code="unknown_method")
    if method not in available:
        raise RequestError(400, f"method {method} needs a thinking model and --sae/--vectors artifacts, which this "
                                f"server was started without; it serves {', '.join(available)}", param="method",
                           code="method_unavailable")
    params = {}
    for name, value in given.items():
        if name not in PARAMS or value is None:
            continue
        kind, rule, methods = PARAMS[name]
        if method not in methods:
            raise RequestError(400, f"{name} is not a setting of method {method} (it is one of "
                                    f"{', '.join(methods)})", param=name)
        params[name] = _value(name, value, kind, rule)
    temperature = _temperature(method, given.get("temperature"), default_temperature)
    seed = given.get("seed")
    if seed is not None:
        seed = _value("seed", seed, int, (lambda v: 0 <= v < 2 ** 63, "in [0, 2**63)"))
        if method in BATCHED and temperature > 0:
            raise RequestError(400, f"seed is not supported for sampled {method} requests: they share the batch's "
                                    f"noise (continuous batching), so a per-request seed could not reproduce them; "
                                    f"omit seed (got {seed}) or use temperature 0", param="seed")
    top_k = params.get("top_k") if temperature > 0 or method in POWER else None   # greedy ignores top_k
    power = tuple(sorted((k, v) for k, v in params.items() if k not in _BATCHED_PARAMS))
    return Settings(method, temperature, top_k, params.get("threshold"), power,
                    seed if method in POWER else None)

"""The generation methods a request selects (``method``) and the settings that decide its tokens.

=================  ===================================================  ==========================================
method             runs                                                 settings
=================  ===================================================  ==========================================
``plain``          ``Engine`` decoding, continuous batching              temperature, top_k
``hybrid-paper``   ``HybridModel`` paper mode, continuous batching        (greedy, as in the paper)
``hybrid-routed``  ``HybridModel`` routed mode, continuous batching       temperature, top_k, threshold
``power-mh``       ``PowerSampler(method="mh")``, one job at a time       alpha, block_size, n_mcmc, top_k, seed
``power-smc``      ``PowerSampler(method="smc")``, one job at a time      alpha, n_particles, ess_threshold,
                                                                        alpha_ramp, top_k, seed
=================  ===================================================  ==========================================

A request that gives a setting its method does not take is refused, naming the setting.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import RequestError

__all__ = ["BATCHED", "HYBRID", "POWER", "METHODS", "PARAMS", "Settings", "settings_of"]

BATCHED = ("plain", "hybrid-paper", "hybrid-routed")      #: run through a continuous-batching Scheduler
HYBRID = ("hybrid-paper", "hybrid-routed")                #: need a thinking model and steering artifacts
POWER = {"power-mh": "mh", "power-smc": "smc"}            #: method -> PowerSampler(method=...)
METHODS = BATCHED + tuple(POWER)

_SAMPLED = ("plain", "hybrid-routed")                     #: take temperature and top_k
_ANY = (lambda v: True, "")
#: method setting -> (type, (test, what it requires), methods that take it)
PARAMS = {
    "top_k": (int, (lambda v: v >= 1, ">= 1"), _SAMPLED + tuple(POWER)),
    "threshold": (float, _ANY, ("hybrid-routed",)),
    "alpha": (float, (lambda v: v >= 1, ">= 1"), tuple(POWER)),
    "block_size": (int, (lambda v: v >= 1, ">= 1"), ("power-mh",)),
    "n_mcmc": (int, (lambda v: v >= 0, ">= 0"), ("power-mh",)),
    "n_particles": (int, (lambda v: v >= 1, ">= 1"), ("power-smc",)),
    "ess_threshold": (float, (lambda v: 0 < v <= 1, "in (0, 1]"), ("power-smc",)),
    "alpha_ramp": (int, (lambda v: v >= 0, ">= 0"), ("power-smc",)),
}
_POWER_PARAMS = ("alpha", "block_size", "n_mcmc", "n_particles", "ess_threshold", "alpha_ramp")


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


def _value(name: str, value, kind: type, rule=_ANY):
    """``value`` as ``kind``, finite and passing ``rule``; a :class:`RequestError` naming ``name``
    otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise RequestError(400, f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}",
                           param=name)
    value = kind(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise RequestError(400, f"{name} must be finite, got {value}", param=name)
    test, requirement = rule
    if not test(value):
        raise RequestError(400, f"{name} must be {requirement}, got {value}", param=name)
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
    power = tuple(sorted((k, v) for k, v in params.items() if k in _POWER_PARAMS))
    return Settings(method, temperature, top_k, params.get("threshold"), power,
                    seed if method in POWER else None)

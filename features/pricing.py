"""What a call cost: a price table per model, and the cost of one event in US dollars.

Teams think in money, and so must an abuse detector: the leaked key that motivates
keywatch was found when the bill reached $42,000. Spend is therefore a feature like any
other (see `features.extractor`), and this module is the one place that turns tokens
into dollars.

Prices are list prices in USD per million tokens, separately for prompt (input) and
completion (output) tokens. The defaults below cover common model names (public list
prices, late 2024); a deployment overrides or extends them in the policy file
(`pricing:`) or in a price file named by `KEYWATCH_PRICES` (same schema).

Model names are normalised before lookup, because gateways report what the client sent:
`gpt-4o-2024-08-06`, `openai/gpt-4o`, `claude-3-5-sonnet@20240620`,
`anthropic.claude-3-5-sonnet-20241022-v2:0` and `claude-3-5-sonnet-latest` all price as
their base model. A model still unknown after that is priced at the configurable
`default` price (deliberately not cheap) and flagged `unknown`: an unknown model is never
silently free, or a key could burn money on any model nobody listed.

The cost of an event is `prompt_tokens * p_in + completion_tokens * p_out` (per token).
When only one of the two is given, the other is `tokens` minus it. When only the total
`tokens` is known, it is priced at a blend of `blend_prompt_share` prompt tokens
(default 0.75, the usual 3:1 input:output mix that price comparisons use).

Examples
--------
>>> table = PriceTable()
>>> table.cost("gpt-4o-2024-08-06", tokens=1500, prompt_tokens=1000, completion_tokens=500)
Cost(usd=0.0075, unknown=False, model='gpt-4o')
>>> table.cost("my-private-model", tokens=1_000_000).unknown
True
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from features.validation import describe

PER_MILLION = 1_000_000.0


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million prompt and completion tokens."""

    prompt: float
    completion: float


DEFAULT_PRICES: dict[str, ModelPrice] = {
    # OpenAI
    "gpt-4o": ModelPrice(2.50, 10.00),
    "chatgpt-4o": ModelPrice(5.00, 15.00),
    "gpt-4o-mini": ModelPrice(0.15, 0.60),
    "gpt-4-turbo": ModelPrice(10.00, 30.00),
    "gpt-4": ModelPrice(30.00, 60.00),
    "gpt-3.5-turbo": ModelPrice(0.50, 1.50),
    "gpt-3.5-turbo-instruct": ModelPrice(1.50, 2.00),
    "o1": ModelPrice(15.00, 60.00),
    "o1-preview": ModelPrice(15.00, 60.00),
    "o1-mini": ModelPrice(3.00, 12.00),
    "o3-mini": ModelPrice(1.10, 4.40),
    "text-embedding-3-small": ModelPrice(0.02, 0.0),
    "text-embedding-3-large": ModelPrice(0.13, 0.0),
    "text-embedding-ada-002": ModelPrice(0.10, 0.0),
    # Anthropic
    "claude-3-5-sonnet": ModelPrice(3.00, 15.00),
    "claude-3-5-haiku": ModelPrice(0.80, 4.00),
    "claude-3-opus": ModelPrice(15.00, 75.00),
    "claude-3-sonnet": ModelPrice(3.00, 15.00),
    "claude-3-haiku": ModelPrice(0.25, 1.25),
    # Google
    "gemini-1.5-pro": ModelPrice(1.25, 5.00),
    "gemini-1.5-flash": ModelPrice(0.075, 0.30),
    # open weights, typical hosted prices
    "llama-3.1-405b": ModelPrice(3.50, 3.50),
    "llama-3.1-70b": ModelPrice(0.88, 0.88),
    "llama-3.1-8b": ModelPrice(0.18, 0.18),
    "mistral-large": ModelPrice(2.00, 6.00),
}
"""List prices (USD per million tokens, late 2024). Edit in the policy's `pricing:`."""

DEFAULT_UNKNOWN_PRICE = ModelPrice(10.00, 30.00)
"""What an unlisted model costs: a large model's price, so unknown never means cheap."""

DEFAULT_BLEND_PROMPT_SHARE = 0.75

_VENDOR_PREFIXES = ("anthropic.", "meta.", "openai.", "mistral.", "google.", "cohere.")
_SUFFIXES = (
    re.compile(r"-\d{4}-\d{2}-\d{2}$"),  # gpt-4o-2024-08-06
    re.compile(r"-\d{8}$"),  # claude-3-5-sonnet-20241022
    re.compile(r"-\d{4}$"),  # gpt-4-0613
    re.compile(r"-latest$"),
    re.compile(r"-v\d+$"),  # bedrock's -v2 (after :0 was cut)
    re.compile(r"-(?:instruct|chat|preview|exp)$"),
)


def normalise_model(name: str) -> str:
    """Lower case, without provider prefixes and deployment suffixes (not yet version
    suffixes: `PriceTable.lookup` strips those one at a time until a name matches)."""
    n = name.strip().lower()
    if "/" in n:
        n = n.rsplit("/", 1)[1]
    n = n.split("@", 1)[0].split(":", 1)[0]
    for prefix in _VENDOR_PREFIXES:
        if n.startswith(prefix):
            n = n[len(prefix):]
            break
    return n


@dataclass(frozen=True, slots=True)
class Cost:
    """The estimated price of one event."""

    usd: float
    unknown: bool
    """True when the model was not in the table and the default price was used."""
    model: str | None
    """The table entry used (None for an unknown model)."""


class ModelPriceIn(BaseModel):
    """A price as written in a policy or price file: USD per million tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: float = Field(ge=0.0, le=10_000.0)
    completion: float = Field(ge=0.0, le=10_000.0)


class PricingConfig(BaseModel):
    """The `pricing:` section of a policy file (also the schema of a price file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelPriceIn] = Field(default_factory=dict)
    """Prices by model name; names are normalised like reported names."""
    default: ModelPriceIn | None = None
    """Price of a model not in the table (default: $10 / $30 per million)."""
    blend_prompt_share: float | None = Field(default=None, ge=0.0, le=1.0)
    """Share of prompt tokens assumed when an event gives only the total."""
    replace_defaults: bool = False
    """True: only `models` are known (the packaged defaults are dropped)."""

    @property
    def is_empty(self) -> bool:
        return (not self.models and self.default is None and self.blend_prompt_share is None
                and not self.replace_defaults)


@dataclass(slots=True)
class PriceTable:
    """Prices by normalised model name, the fallback price and the blend."""

    prices: dict[str, ModelPrice] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    default: ModelPrice = DEFAULT_UNKNOWN_PRICE
    blend_prompt_share: float = DEFAULT_BLEND_PROMPT_SHARE
    _cache: dict[str, tuple[ModelPrice, str | None]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_configs(cls, *configs: PricingConfig | None) -> PriceTable:
        """The packaged defaults, overridden by each config in turn (settings, policy)."""
        table = cls()
        for cfg in configs:
            if cfg is None:
                continue
            if cfg.replace_defaults:
                table.prices = {}
            for name, p in cfg.models.items():
                table.prices[normalise_model(name)] = ModelPrice(p.prompt, p.completion)
            if cfg.default is not None:
                table.default = ModelPrice(cfg.default.prompt, cfg.default.completion)
            if cfg.blend_prompt_share is not None:
                table.blend_prompt_share = cfg.blend_prompt_share
        return table

    def lookup(self, model: str | None) -> tuple[ModelPrice, str | None]:
        """(price, table entry) for a reported model name; entry None = unknown."""
        if not model:
            return self.default, None
        hit = self._cache.get(model)
        if hit is not None:
            return hit
        name = normalise_model(model)
        found: tuple[ModelPrice, str | None] = (self.default, None)
        for _ in range(6):  # strip one version suffix at a time: -2024-08-06, -latest...
            if name in self.prices:
                found = (self.prices[name], name)
                break
            for pattern in _SUFFIXES:
                shorter = pattern.sub("", name)
                if shorter != name:
                    name = shorter
                    break
            else:
                break
        if len(self._cache) < 4096:  # reported names are few; a flood of junk is not kept
            self._cache[model] = found
        return found

    def cost(self, model: str | None, *, tokens: int = 0, prompt_tokens: int | None = None,
             completion_tokens: int | None = None) -> Cost:
        """The cost of one call. An event that used no tokens costs nothing and is never
        `unknown`, whatever its model (a listing or a refused call)."""
        if not tokens and not prompt_tokens and not completion_tokens:
            return Cost(0.0, False, None)
        price, entry = self.lookup(model)
        if prompt_tokens is not None or completion_tokens is not None:
            if prompt_tokens is None:
                prompt_tokens = max(tokens - (completion_tokens or 0), 0)
            if completion_tokens is None:
                completion_tokens = max(tokens - prompt_tokens, 0)
            usd = (prompt_tokens * price.prompt + completion_tokens * price.completion)
        else:
            share = self.blend_prompt_share
            usd = tokens * (share * price.prompt + (1.0 - share) * price.completion)
        return Cost(usd / PER_MILLION, entry is None, entry)

    def cost_of(self, event: Any) -> Cost:
        """The cost of an `Event` (or anything with its token and model fields)."""
        return self.cost(event.model, tokens=event.tokens, prompt_tokens=event.prompt_tokens,
                         completion_tokens=event.completion_tokens)

    def cost_of_record(self, record: Mapping[str, Any]) -> Cost:
        """The cost of a logged event record (a dict with the contract's field names)."""
        return self.cost(record.get("model"), tokens=int(record.get("tokens") or 0),
                         prompt_tokens=record.get("prompt_tokens"),
                         completion_tokens=record.get("completion_tokens"))


def load_price_file(path: str | Path) -> PricingConfig:
    """A YAML or JSON price file with the `pricing:` schema (the section may be the whole
    file or under a top-level `pricing` key). Raises ValueError naming the problem."""
    import yaml
    from pydantic import ValidationError

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"price file {p}: cannot read: {type(exc).__name__}: {exc}"[:500]
                         ) from None
    if isinstance(data, dict) and "pricing" in data:
        data = data["pricing"]
    try:
        return PricingConfig.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"price file {p}: {describe(exc, empty='pricing')}") from None

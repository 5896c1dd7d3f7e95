"""Table-driven state-dict conversion between megatrain and Hugging Face parameter names.

Each family lists its parameters once, as rules (megatrain pattern, HF pattern(s), how the tensor
changes). ``KeyMap.to_hf`` and ``KeyMap.from_hf`` both read that one table, so the two directions
cannot drift apart. A ``*`` in a pattern stands for a layer index.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

StateDict = dict[str, Tensor]
Split = Callable[[Tensor], Sequence[Tensor]]
Join = Callable[[Sequence[Tensor]], Tensor]
Fallback = Callable[[StateDict], Tensor]


def _whole(tensor: Tensor) -> tuple[Tensor]:
    return (tensor,)


def _first(parts: Sequence[Tensor]) -> Tensor:
    return parts[0]


def _transpose(tensor: Tensor) -> Tensor:
    return tensor.t().contiguous()


def _cat(parts: Sequence[Tensor]) -> Tensor:
    return torch.cat(list(parts))


@dataclass(frozen=True)
class Rule:
    """One megatrain parameter and the HF parameter(s) it is.

    ``split`` makes the HF tensors (in ``hf`` order) of the megatrain one and ``join`` undoes it.
    With ``aliases`` the HF names hold one tensor, so any one of them is enough on the way in.
    ``tied_to`` (a megatrain name) marks a parameter that *is* another one: neither side reads
    it, both write it as its source; with ``tied_if`` (a megatrain name) only when that one is
    there too (a tied head that some models of the family lack). ``fallback`` makes the tensor
    (of a name without ``*``) from the converted ones when the HF side lacks it.
    """

    mt: str
    hf: tuple[str, ...]
    split: Split = _whole
    join: Join = _first
    aliases: bool = False
    tied_to: str | None = None
    tied_if: str | None = None
    fallback: Fallback | None = None


def rename(mt: str, hf: str, fallback: Fallback | None = None) -> Rule:
    """The same tensor under another name."""
    return Rule(mt, (hf,), fallback=fallback)


def params(mt_module: str, hf_module: str, names: Iterable[str] = ("weight", "bias")
           ) -> tuple[Rule, ...]:
    """A renamed module whose parameters keep their names (a Linear or LayerNorm)."""
    return tuple(rename(f"{mt_module}.{name}", f"{hf_module}.{name}") for name in names)


def transposed(mt: str, hf: str) -> Rule:
    """A weight HF stores as (in, out) (GPT-2's Conv1D); a transpose is its own inverse."""
    return Rule(mt, (hf,), split=lambda t: (_transpose(t),), join=lambda p: _transpose(p[0]))


def equal_parts(tensor: Tensor, n: int) -> tuple[Tensor, ...]:
    """``tensor``'s rows in ``n`` equal blocks, each contiguous (safetensors needs that)."""
    return tuple(part.contiguous() for part in tensor.chunk(n))


def fused(mt: str, hf: tuple[str, ...], split: Split | None = None) -> Rule:
    """One megatrain tensor that is HF's tensors concatenated by rows (a fused q/k/v); ``split``
    defaults to equal blocks."""
    return Rule(mt, hf, split=split or functools.partial(equal_parts, n=len(hf)), join=_cat)


def aliased(mt: str, *hf: str) -> Rule:
    """One tensor that HF names several times (T5's shared embedding, BERT's MLM bias)."""
    return Rule(mt, hf, split=lambda t: (t,) * len(hf), aliases=True)


def tied(mt: str, hf: str, source: str, if_present: str | None = None) -> Rule:
    """A parameter that is always ``source`` (a tied output head), on both sides; with
    ``if_present`` (a megatrain name) only in models that have that parameter too."""
    return Rule(mt, (hf,), tied_to=source, tied_if=if_present)


def under(mt_prefix: str, hf_prefix: str, rules: Iterable[Rule]) -> tuple[Rule, ...]:
    """``rules`` inside a module: both sides' names prefixed (a block's parameters)."""
    return tuple(dataclasses.replace(r, mt=mt_prefix + r.mt, hf=tuple(hf_prefix + h for h in r.hf))
                 for r in rules)


@functools.cache
def _regex(pattern: str) -> re.Pattern[str]:
    """``blocks.*.ln_1.weight`` -> a regex whose one group (if any) is the layer index."""
    return re.compile(r"(\d+)".join(re.escape(part) for part in pattern.split("*")))


def _match(pattern: str, name: str) -> re.Match[str] | None:
    return _regex(pattern).fullmatch(name)


def _index(m: re.Match[str]) -> str | None:
    """The layer index a name matched ``*`` with; None for a pattern without one."""
    return m.group(1) if m.re.groups else None


def _fill(pattern: str, index: str | None) -> str:
    return pattern if index is None else pattern.replace("*", index)


def _same(name: str) -> str:
    return name


@dataclass(frozen=True)
class KeyMap:
    """A family's rules, read both ways.

    ``hf_ignored``: patterns of HF names that hold nothing megatrain models (buffers, other
    heads); ``hf_spelling``: an HF name as current transformers spells it (older checkpoints).
    """

    name: str  # for errors, e.g. "GPT-2"
    rules: tuple[Rule, ...]
    hf_ignored: tuple[str, ...] = ()
    hf_spelling: Callable[[str], str] = _same

    def to_hf(self, sd: StateDict) -> StateDict:
        """megatrain state dict -> HF state dict; a tied or aliased parameter is one tensor under
        several names (drop the later ones before saving with safetensors)."""
        out: StateDict = {}
        for name, tensor in sd.items():
            rule, index = self._mt_rule(name)
            if rule.tied_to is None:
                out.update(zip(_fills(rule.hf, index), rule.split(tensor), strict=True))
        for rule, mt_source, hf_source in self._ties(sd):
            out[rule.hf[0]] = _tie_source(out, hf_source, mt_source, f"megatrain {self.name}")
        return out

    def from_hf(self, sd: StateDict) -> StateDict:
        """HF state dict -> megatrain state dict; HF names in ``hf_ignored`` are left out."""
        found: dict[tuple[int, str | None], dict[int, Tensor]] = {}
        for raw_name, tensor in sd.items():
            name = self.hf_spelling(raw_name)
            if any(_match(p, name) for p in self.hf_ignored):
                continue
            at, position, index = self._hf_rule(name, raw_name)
            if self.rules[at].tied_to is None:
                found.setdefault((at, index), {}).setdefault(position, tensor)
        out = {_fill(self.rules[at].mt, index): self._join(self.rules[at], index, parts)
               for (at, index), parts in found.items()}
        for rule, mt_source, hf_source in self._ties(out):
            out[rule.mt] = _tie_source(out, mt_source, hf_source, f"Hugging Face {self.name}")
        for rule in self.rules:
            if rule.fallback is not None and rule.mt not in out:
                out[rule.mt] = rule.fallback(out)
        return out

    def _mt_rule(self, name: str) -> tuple[Rule, str | None]:
        for rule in self.rules:
            if m := _match(rule.mt, name):
                return rule, _index(m)
        raise KeyError(f"not a megatrain {self.name} parameter name: {name!r}")

    def _hf_rule(self, name: str, raw_name: str) -> tuple[int, int, str | None]:
        """(rule number, position among its HF names, layer index) of an HF name."""
        for at, rule in enumerate(self.rules):
            for position, pattern in enumerate(rule.hf):
                if m := _match(pattern, name):
                    return at, position, _index(m)
        raise KeyError(f"not a Hugging Face {self.name} parameter name: {raw_name!r}")

    def _ties(self, mt_sd: StateDict) -> list[tuple[Rule, str, str]]:
        """(tied rule, its source's megatrain name, its source's HF name) for each tie that
        applies to a model with the megatrain parameters ``mt_sd``."""
        ties = []
        for rule in self.rules:
            if rule.tied_to is not None and (rule.tied_if is None or rule.tied_if in mt_sd):
                source, index = self._mt_rule(rule.tied_to)
                ties.append((rule, rule.tied_to, _fill(source.hf[0], index)))
        return ties

    def _join(self, rule: Rule, index: str | None, parts: dict[int, Tensor]) -> Tensor:
        """The megatrain tensor of the HF parts found; every part of a fused one is needed."""
        if rule.aliases:
            return parts[min(parts)]
        missing = [name for i, name in enumerate(_fills(rule.hf, index)) if i not in parts]
        if missing:
            raise KeyError(f"Hugging Face {self.name} state dict has no {missing[0]!r}, a part "
                           f"of {_fill(rule.mt, index)!r}")
        return rule.join([parts[i] for i in range(len(rule.hf))])


def _fills(patterns: tuple[str, ...], index: str | None) -> list[str]:
    return [_fill(p, index) for p in patterns]


def _tie_source(out: StateDict, name: str, input_name: str, side: str) -> Tensor:
    """``out[name]``, the source of a tie; missing, a KeyError naming the input's missing key."""
    if name not in out:
        raise KeyError(f"{side} state dict has no {input_name!r} (a tied parameter is that one)")
    return out[name]


__all__ = ["KeyMap", "Rule", "StateDict", "aliased", "equal_parts", "fused", "params", "rename",
           "tied", "transposed", "under"]

"""Choosing the next token from logits, with vLLM / OpenAI sampling parameters.

`SamplingParams` validates a request once, up front, so a bad value fails at `add_request` with a message
naming the field, not deep inside a batched step. `sample` turns one batch of logits into one token per
row. Each row draws only from its own `torch.Generator`, so a seeded request gives the same tokens no
matter which other requests share its batch.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

MAX_LOGPROBS = 20  # OpenAI's cap on top_logprobs
# Temperatures below this are greedy, as in vLLM: dividing logits by 4e-244 (a fuzzer's value)
# underflows to a division by zero in fp32 and gives NaN probabilities.
GREEDY_BELOW = 1e-5
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


# ---------------------------------------------------------------------------------------------------------
# Parameters


def _int(name: str, value) -> int:
    """An int (numpy ints welcome); bools are rejected because `max_tokens=True` is always a mistake."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _float(name: str, value) -> float:
    """A finite real number; NaN and inf are rejected since no range check can catch NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


@dataclass
class SamplingParams:
    """How to pick tokens for one request; defaults and ranges follow vLLM and the OpenAI API.

    temperature 0 (below GREEDY_BELOW) is greedy. top_k 0 or -1 disables it. presence / frequency penalties apply to generated
    tokens only (OpenAI); repetition_penalty applies to prompt and generated tokens (vLLM). logprobs asks
    for that many top alternatives per generated token, besides the chosen token's own logprob.
    `stop` and `stop_token_ids` are normalised to lists.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # False: special tokens (e.g. V4's </think>) appear in the text
    # structured output: a factory whose new() gives each sequence a constraint with mask_(logits_row)
    # and accept(token) (moeflash.structured.Grammar); the engine knows nothing else of it
    constraint: object | None = None
    return_experts: bool = False  # report the routed experts behind each generated token (MoE models)

    def __post_init__(self) -> None:
        self.max_tokens = _int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

        self.temperature = _float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature:g}")

        self.top_p = _float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = disabled), got {self.top_p:g}")

        self.top_k = _int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 or -1 (disabled) or >= 1, got {self.top_k}")

        self.min_p = _float("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = disabled), got {self.min_p:g}")

        if self.seed is not None:
            self.seed = _int("seed", self.seed)
            if not _SEED_MIN <= self.seed <= _SEED_MAX:
                raise ValueError(f"seed must be in [{_SEED_MIN}, {_SEED_MAX}], got {self.seed}")

        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _stop_token_ids(self.stop_token_ids)

        for name in ("presence_penalty", "frequency_penalty"):
            value = _float(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value:g}")
            setattr(self, name, value)

        self.repetition_penalty = _float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = disabled), got {self.repetition_penalty:g}")

        if self.logprobs is not None:
            self.logprobs = _int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}] or None, got {self.logprobs}")

        for name in ("ignore_eos", "skip_special_tokens"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {type(value).__name__} {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _stop_strings(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__} {stop!r}")
    for s in stop:
        if not isinstance(s, str):
            raise ValueError(f"stop must contain only strings, got {type(s).__name__} {s!r}")
        if not s:
            raise ValueError("stop must not contain the empty string; it would match before any text")
    return list(stop)


def _stop_token_ids(ids) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
        raise ValueError(f"stop_token_ids must be a list of ints, got {type(ids).__name__} {ids!r}")
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0:
            raise ValueError(f"stop_token_ids must contain only token ids >= 0, got {i!r}")
        out.append(int(i))
    return out


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A generator seeded for one request; None without a seed, so the draw uses torch's global RNG."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# Sampling


@dataclass
class SampleResult:
    """One row's pick. logprob and top_logprobs come from the raw logits (before penalties, temperature
    and filters), as OpenAI reports them; top_logprobs is None unless the request asked for logprobs."""

    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None = None


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None] | None,
           prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]]) -> list[SampleResult]:
    """One token per row of `logits` [B, V].

    Order: repetition / presence / frequency penalties -> temperature (0 = argmax, lowest id on ties)
    -> top_k -> top_p -> min_p -> a multinomial draw with the row's generator (torch's global RNG when
    None). prompt_ids / output_ids are each row's tokens so far; only the penalties read them.
    """
    raw = _check_batch(logits, params, generators, prompt_ids, output_ids)
    batch, vocab = raw.shape
    if generators is None:
        generators = [None] * batch

    x = raw
    for i, p in enumerate(params):
        if p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0:
            if x is raw:
                x = raw.clone()
            x[i] = _penalise(x[i], p, prompt_ids[i], output_ids[i], i)

    tokens = torch.empty(batch, dtype=torch.long, device=raw.device)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if greedy:
        tokens[greedy] = x[greedy].argmax(dim=-1)  # argmax returns the first maximum: lowest id on ties
    if drawn:
        rows = x[drawn]
        temps = torch.tensor([params[i].temperature for i in drawn], device=raw.device).unsqueeze(1)
        # Subtracting the max first keeps tiny temperatures from overflowing to inf - inf = NaN.
        rows = (rows - rows.amax(dim=-1, keepdim=True)) / temps
        rows = _filter(rows, [params[i] for i in drawn])
        probs = torch.softmax(rows, dim=-1)
        tokens[drawn] = _draw(probs, [generators[i] for i in drawn])

    raw_logprobs = torch.log_softmax(raw, dim=-1)
    chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    tops = _top_logprobs(raw_logprobs, params)
    return [SampleResult(int(t), float(lp), top) for t, lp, top in zip(tokens.tolist(), chosen.tolist(), tops)]


def _check_batch(logits, params, generators, prompt_ids, output_ids) -> torch.Tensor:
    """The logits as fp32 [B, V], after checking that every per-row list matches the batch."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a float tensor [batch, vocab], got {shape}; "
                         "take the last position's logits of each sequence")
    batch = logits.shape[0]
    lists = {"params": params, "prompt_ids": prompt_ids, "output_ids": output_ids}
    if generators is not None:
        lists["generators"] = generators
    for name, values in lists.items():
        if len(values) != batch:
            raise ValueError(f"{name} has {len(values)} entries but logits has {batch} rows; pass one per row")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise ValueError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}")
    raw = logits.detach().float()
    bad = ~torch.isfinite(raw.amax(dim=-1))
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(f"logits row {row} has NaN, +inf or no finite value; the forward pass overflowed or "
                         "masked every token (try float32, or check the model's weights)")
    return raw


def _ids(ids, vocab: int, name: str, row: int, device) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
        raise ValueError(f"{name}[{row}] holds token id {bad}, outside the vocabulary 0..{vocab - 1}; "
                         "were these ids made by another model's tokenizer?")
    return t


def _penalise(row: torch.Tensor, p: SamplingParams, prompt, output, i: int) -> torch.Tensor:
    """vLLM's repetition penalty over prompt + output, then OpenAI's presence / frequency over output."""
    vocab = row.shape[0]
    out = _ids(output, vocab, "output_ids", i, row.device)
    if p.repetition_penalty != 1:
        seen = torch.zeros(vocab, dtype=torch.bool, device=row.device)
        seen[_ids(prompt, vocab, "prompt_ids", i, row.device)] = True
        seen[out] = True
        penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        row = torch.where(seen, penalised, row)
    if p.presence_penalty != 0 or p.frequency_penalty != 0:
        counts = torch.bincount(out, minlength=vocab).to(row.dtype)
        row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(row.dtype)
    # A tiny repetition penalty (5e-324 is a valid "> 0") divides a logit into +inf, and the softmax
    # of a row holding inf is NaN: keep every penalised logit finite (-inf, a banned token, stays).
    return row.clamp(max=torch.finfo(row.dtype).max)


def _filter(rows: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """top_k, then top_p, then min_p, all rows at once; dropped tokens get -inf."""
    vocab = rows.shape[-1]
    use_k = any(p.top_k > 0 for p in params)
    use_p = any(p.top_p < 1 for p in params)
    use_min = any(p.min_p > 0 for p in params)
    if not (use_k or use_p or use_min):
        return rows
    device = rows.device
    # A stable descending sort puts the lowest id first among equal logits, so ties are cut reproducibly.
    ordered, order = torch.sort(rows, dim=-1, descending=True, stable=True)
    keep = torch.ones_like(ordered, dtype=torch.bool)
    if use_k:
        ks = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=device)
        keep &= torch.arange(vocab, device=device) < ks.unsqueeze(1)
        ordered = ordered.masked_fill(~keep, -math.inf)
    if use_p:
        probs = torch.softmax(ordered, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        ps = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)
        # Keep a token while the mass before it is short of top_p: the smallest set reaching top_p.
        keep &= (mass_before < ps) | (ps >= 1)
        keep[:, 0] = True
        ordered = ordered.masked_fill(~keep, -math.inf)
    if use_min:
        probs = torch.softmax(ordered, dim=-1)
        mins = torch.tensor([p.min_p for p in params], device=device).unsqueeze(1)
        keep &= probs >= mins * probs[:, :1]
        keep[:, 0] = True
        ordered = ordered.masked_fill(~keep, -math.inf)
    return torch.full_like(rows, -math.inf).scatter(-1, order, ordered)


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One multinomial draw per row; seeded rows each consume only their own generator."""
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        out[unseeded] = torch.multinomial(probs[unseeded], 1).squeeze(1)
    for i, g in enumerate(generators):
        if g is not None:
            row = probs[i] if g.device == probs.device else probs[i].to(g.device)
            out[i] = torch.multinomial(row, 1, generator=g).to(probs.device).squeeze(0)
    return out


def _top_logprobs(raw_logprobs: torch.Tensor, params) -> list[list[tuple[int, float]] | None]:
    wanted = [p.logprobs for p in params]
    most = max((n for n in wanted if n is not None), default=0)
    if most == 0:
        return [None if n is None else [] for n in wanted]
    values, ids = raw_logprobs.topk(min(most, raw_logprobs.shape[1]), dim=-1, sorted=True)
    values, ids = values.tolist(), ids.tolist()
    return [None if n is None else list(zip(ids[r][:n], values[r][:n])) for r, n in enumerate(wanted)]

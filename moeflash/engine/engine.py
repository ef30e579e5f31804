"""LLMEngine: requests in, tokens out, many sequences advanced by one batched forward per step.

`add_request` queues a prompt; each `step` asks the scheduler for a plan (decode tokens plus prompt
chunks within a token budget), runs the model once over all of them as a flat batch, samples a token
for every sequence whose prompt is complete, applies stop conditions and frees finished states at
once. `generate` and `stream` are conveniences built on `step`.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator

import torch

from ..kernels import ROW_KERNEL_MAX_ROWS
from .detok import IncrementalDetokenizer
from .sampler import SamplingParams, make_generator, sample
from .scheduler import Scheduler
from .sequence import Logprob, RequestOutput, Sequence, Status
from .forward import run_tokens


class LLMEngine:
    def __init__(self, model, tokenizer=None, max_num_seqs: int = 16,
                 max_num_batched_tokens: int = 512, max_model_len: int | None = None,
                 max_state_bytes: int | None = None, num_threads: int | None = None,
                 batch_invariant: bool = False):
        """`max_num_batched_tokens` bounds the tokens of one step (decode tokens + prompt chunks);
        `max_state_bytes` caps the sequence state held at once (admission waits when full).
        `batch_invariant`: a request's tokens never depend on what else is running. A step's decode
        rows then run in forward calls of at most ROW_KERNEL_MAX_ROWS rows (the kernels' row path, whose
        result for a row does not depend on the other rows) and each prompt chunk in a call of its own,
        never mixed; costs extra weight reads when more than 16 sequences decode or prompts arrive."""
        if num_threads:
            torch.set_num_threads(num_threads)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        self.max_state_bytes = max_state_bytes
        self.scheduler = Scheduler(max_num_seqs, max_num_batched_tokens)
        self.batch_invariant = batch_invariant
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._queues: dict[str, deque[RequestOutput]] = {}
        self.device = model.embed.weight.device
        # cumulative counters: steps, prompt tokens prefilled, tokens generated, tokens run through the
        # model, and distinct routed experts read (summed over layers and steps; MoE models only)
        self.stats = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0, "forward_tokens": 0,
                      "routed_experts_read": 0}

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("prompt_token_ids is empty: give at least one token")
        vocab = self.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"the model's context length {self.max_model_len}")
        if (params.stop) and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; give LLMEngine(tokenizer=...) or use stop_token_ids")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise ValueError(f"request id {rid!r} is already in use")
        detok = (IncrementalDetokenizer(self.tokenizer, params.stop or [], params.skip_special_tokens)
                 if self.tokenizer is not None else None)
        seq = Sequence(rid, prompt, params, make_generator(params.seed), detok)
        self.seqs[rid] = seq
        self.scheduler.add(seq)
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its state; False if it is unknown or already finished."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.status == Status.FINISHED:
            return False
        self.scheduler.remove(seq)
        self._finish(seq, "abort")
        out = self._output(seq, [], "", [])
        if request_id in self._queues:
            self._queues[request_id].append(out)
        del self.seqs[request_id]
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- memory -----------------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Live bytes of all sequence states held now."""
        return sum(s.state.used_bytes() for s in self.scheduler.running if s.state is not None)

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def num_states(self) -> int:
        return sum(1 for s in self.seqs.values() if s.state is not None)

    def _admit(self, seq: Sequence) -> bool:
        if self.max_state_bytes is not None and self.scheduler.running:
            need = self.model.state_bytes(len(seq.prompt) + seq.params.max_tokens)
            if self.state_bytes() + need > self.max_state_bytes:
                return False
        seq.state = self.model.new_seq_state()
        return True

    def _finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.state = None  # free the state at once

    # -- the step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one batched forward; return the outputs of the requests that advanced."""
        plan = self.scheduler.schedule(self._admit)
        if not plan:
            return []
        self.stats["steps"] += 1
        logits, samplers = [], []
        for group in self._groups(plan):
            rows, seqs = self._forward(group)
            if seqs:
                logits.append(self.model.logits(rows).float())
                samplers.extend(seqs)
        outputs: list[RequestOutput] = []
        if samplers:
            results = sample(torch.cat(logits), [s.params for s in samplers], [s.generator for s in samplers],
                             [s.prompt for s in samplers], [s.output for s in samplers])
            for seq, res in zip(samplers, results):
                outputs.append(self._append(seq, res))
        for out in outputs:
            if out.request_id in self._queues:
                self._queues[out.request_id].append(out)
        return outputs

    def _groups(self, plan: list) -> list[list]:
        """The forward calls of one step: all of it at once, or (batch_invariant) decode rows in calls
        of at most ROW_KERNEL_MAX_ROWS and each prompt chunk alone."""
        if not self.batch_invariant:
            return [plan]
        decode = [(seq, n) for seq, n in plan if n == 1]
        width = ROW_KERNEL_MAX_ROWS
        return [decode[i:i + width] for i in range(0, len(decode), width)] + [[e] for e in plan if e[1] != 1]

    def _forward(self, group: list) -> tuple[torch.Tensor, list[Sequence]]:
        """Run one forward call over (seq, n_tokens) pairs; (final streams of the rows to sample,
        their sequences)."""
        tokens, lengths, seqs, sample_rows, samplers = [], [], [], [], []
        offset = 0
        for seq, n in group:
            start = seq.consumed
            tokens.extend(seq.tokens(start, n))
            lengths.append(n)
            seqs.append(seq)
            if start + n == len(seq.prompt) + len(seq.output):  # all known tokens fed: sample
                sample_rows.append(offset + n - 1)
                samplers.append(seq)
            if seq.prefilling:
                self.stats["prompt_tokens"] += min(n, len(seq.prompt) - start)
            offset += n
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        streams = run_tokens(self.model, ids, [s.state for s in seqs], lengths)
        self.stats["forward_tokens"] += len(tokens)
        if hasattr(self.model, "experts_read"):
            self.stats["routed_experts_read"] += self.model.experts_read()
        return streams[sample_rows], samplers

    def _append(self, seq: Sequence, res) -> RequestOutput:
        tok = res.token_id
        seq.output.append(tok)
        self.stats["generated_tokens"] += 1
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        lp = None
        if seq.params.logprobs is not None:
            lp = [Logprob(tok, res.logprob, res.top_logprobs)]
            seq.logprobs.extend(lp)
        p = seq.params
        reason, stop_reason, new_text = None, None, ""
        is_eos = tok == self.config.eos_token_id and not p.ignore_eos
        if is_eos or (p.stop_token_ids and tok in p.stop_token_ids):
            reason, stop_reason = "stop", tok
        if seq.detok is not None:
            if reason is None:
                new_text = seq.detok.push(tok)
                if seq.detok.stopped:
                    reason, stop_reason = "stop", seq.detok.stop_reason
            if reason is None and len(seq.output) >= p.max_tokens:
                reason = "length"
            if reason is not None and not seq.detok.stopped:
                new_text += seq.detok.flush()
            seq.text += new_text
        elif reason is None and len(seq.output) >= p.max_tokens:
            reason = "length"
        if reason is not None:
            self.scheduler.remove(seq)
            self._finish(seq, reason, stop_reason)
            if seq.request_id not in self._queues:
                del self.seqs[seq.request_id]
        return self._output(seq, [tok], new_text, lp)

    def _output(self, seq: Sequence, new_ids, new_text, lp) -> RequestOutput:
        return RequestOutput(seq.request_id, list(new_ids), new_text, list(seq.output), seq.text,
                             seq.status == Status.FINISHED, seq.finish_reason, len(seq.prompt), lp,
                             seq.stop_reason)

    # -- conveniences -----------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion together (continuous batching); final outputs in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(rids) and self.has_unfinished():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[r] for r in rids]

    def stream(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
               request_id: str | None = None) -> Iterator[RequestOutput]:
        """Yield this request's deltas as they are produced; other requests keep running in the same
        steps. Closing the iterator early aborts the request."""
        rid = self.add_request(prompt_token_ids, params, request_id)
        queue = self._queues.setdefault(rid, deque())
        done = False
        try:
            while not done:
                while not queue and self.has_unfinished():
                    self.step()
                if not queue:
                    break
                out = queue.popleft()
                done = out.finished
                yield out
        finally:
            self._queues.pop(rid, None)
            if not done:
                self.abort(rid)
            self.seqs.pop(rid, None)

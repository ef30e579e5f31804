"""LLMEngine: requests in, tokens out, many sequences advanced by one batched forward per step.

`add_request` queues a prompt; each `step` asks the scheduler for a plan (decode tokens plus prompt
chunks within a token budget), runs the model once over all of them as a flat batch, samples a token
for every sequence whose prompt is complete, applies stop conditions and frees finished states at
once. `generate` and `stream` are conveniences built on `step`.

A failure fails one sequence, not the step: when a forward call raises, its sequences drop their
state and go back to the head of the queue as suspects (preemption by recompute: they feed prompt +
output again); a suspect runs in a forward call of its own, so the one that fails again alone is
finished with `finish_reason` "error" and the others continue with the same tokens. Sampling and
stop handling fail per sequence the same way.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Iterator

import torch

from ..kernels import ROW_KERNEL_MAX_ROWS
from .detok import IncrementalDetokenizer
from .sampler import SamplingParams, make_generator, sample
from .scheduler import Scheduler
from .sequence import Logprob, RequestOutput, Sequence, Status
from .forward import advance, run_tokens

log = logging.getLogger("moeflash.engine")


class LLMEngine:
    def __init__(self, model, tokenizer=None, max_num_seqs: int = 16,
                 max_num_batched_tokens: int = 512, max_model_len: int | None = None,
                 max_state_bytes: int | None = None, num_threads: int | None = None,
                 batch_invariant: bool = False, prefix_cache=None, share_prompts: bool = True,
                 decode_graphs: bool | None = None, graph_max_len: int | None = None,
                 decode_compile: bool = False):
        """`max_num_batched_tokens` bounds the tokens of one step (decode tokens + prompt chunks);
        `max_state_bytes` caps the sequence state held at once (admission waits when full).
        `batch_invariant`: a request's tokens never depend on what else is running. A step's decode
        rows then run in forward calls of at most ROW_KERNEL_MAX_ROWS rows (the kernels' row path, whose
        result for a row does not depend on the other rows) and each prompt chunk in a call of its own,
        never mixed; costs extra weight reads when more than 16 sequences decode or prompts arrive.
        `prefix_cache` (`PrefixCache`): prompts that start like earlier ones reuse their saved states.
        `decode_graphs`: run pure decode steps over static slots (engine/graphs.py), replayed as CUDA
        graphs on a GPU (piecewise around the routed experts when an expert store serves them); default:
        on for a V4 model on a GPU. Sequences up to `graph_max_len` tokens (default min(context, 16384))
        fit the slots; longer ones decode eagerly. `decode_compile`: torch.compile the static step before
        recording it (opt-in; Inductor fuses its elementwise chains; compiling takes a while per bucket)."""
        if num_threads:
            torch.set_num_threads(num_threads)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        self.max_state_bytes = max_state_bytes
        self.scheduler = Scheduler(max_num_seqs, max_num_batched_tokens)
        self.batch_invariant = batch_invariant
        self.prefix_cache = prefix_cache
        self.share_prompts = share_prompts  # n > 1: prefill a prompt once and copy its state
        # called before each forward call with (request ids, start positions, tokens, lengths, live ids):
        # an expert-parallel leader sends it to the other ranks, which run the same call (parallel.py)
        self.forward_hook = None
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._queues: dict[str, deque[RequestOutput]] = {}
        self.device = model.embed.weight.device
        if decode_graphs is None:
            decode_graphs = self.device.type == "cuda" and hasattr(model, "forward_static")
        self.graphs = None
        if decode_graphs:  # piecewise when an expert store serves the experts (engine/graphs.py)
            from .graphs import GraphDecoder

            try:
                self.graphs = GraphDecoder(model, max_num_seqs, graph_max_len or min(self.max_model_len, 16384),
                                           compile=decode_compile)
            except Exception as e:  # a step that cannot be recorded still runs: eagerly, and says why
                if self.device.type != "cuda":
                    raise
                log.warning("decode steps run eagerly: recording them as CUDA graphs failed (%s: %s)",
                            type(e).__name__, e)
        # cumulative counters: steps, prompt tokens prefilled, tokens generated, tokens run through the
        # model, distinct routed experts read (summed over layers and steps; MoE models only), sequences
        # preempted after a failed forward call, requests failed, and prompt tokens not recomputed
        # because a follower copied its leader's state (n > 1), and prompt tokens taken from the prefix cache
        self.stats = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0, "forward_tokens": 0,
                      "routed_experts_read": 0, "preemptions": 0, "failed_requests": 0, "prompt_tokens_shared": 0,
                      "prompt_tokens_cached": 0}

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, cache_hints: list[int] = ()) -> str:
        """Queue a prompt. `cache_hints`: positions of the prompt worth saving in the prefix cache
        besides its end (e.g. where its last chat message starts)."""
        params = params or SamplingParams()
        prompt = self.check_request(prompt_token_ids, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise ValueError(f"request id {rid!r} is already in use")
        detok = (IncrementalDetokenizer(self.tokenizer, params.stop or [], params.skip_special_tokens)
                 if self.tokenizer is not None else None)
        seq = Sequence(rid, prompt, params, make_generator(params.seed), detok)
        if params.constraint is not None:
            seq.constraint = params.constraint.new()
        if len(prompt) > 1 and self.share_prompts:  # the same prompt already queued: prefill it once (n > 1)
            leader = next((w for w in self.scheduler.waiting if w.leader is None and w.prompt == prompt), None)
            if leader is not None:
                seq.leader = leader
                leader.followers += 1
        if self.prefix_cache is not None:
            seq.cache_marks = self.prefix_cache.marks(prompt, list(cache_hints))
        self.seqs[rid] = seq
        self.scheduler.add(seq)
        return rid

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt as ints, or ValueError naming what is wrong. Reads only the configuration, so any
        thread may call it while a step runs."""
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("prompt_token_ids is empty: give at least one token")
        vocab = self.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if params.return_experts and not self.moe_layers():
            raise ValueError("return_experts needs a MoE model; this one is dense")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"the model's context length {self.max_model_len}")
        if (params.stop) and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; give LLMEngine(tokenizer=...) or use stop_token_ids")
        if self.max_state_bytes is not None:
            need = self.model.state_bytes(len(prompt) + params.max_tokens)
            if need > self.max_state_bytes:
                raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) needs "
                                 f"{need / 2**30:.2f} GiB of sequence state; the engine holds at most "
                                 f"{self.max_state_bytes / 2**30:.2f} GiB")
        return prompt

    def abort(self, request_id: str, reason: str = "abort") -> RequestOutput | None:
        """Stop a request now and free its state; its final output (finish_reason `reason`: "abort",
        or "timeout" for a deadline), or None if it is unknown or already finished."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.status == Status.FINISHED:
            return None
        self.scheduler.remove(seq)
        self._finish(seq, reason)
        out = self._output(seq, [], "", [])
        if request_id in self._queues:
            self._queues[request_id].append(out)
        del self.seqs[request_id]
        return out

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
        leader = seq.leader
        if leader is not None:
            at = len(seq.prompt) - 1  # where the follower takes over
            if leader.status == Status.RUNNING and leader.state is not None and leader.consumed < at:
                return False  # not there yet: wait (the leader pauses there)
            if not (leader.status == Status.RUNNING and leader.state is not None and leader.consumed == at):
                self._detach(seq)  # the leader finished, failed or went past: prefill alone
        if self.max_state_bytes is not None and self.scheduler.running:
            need = self.model.state_bytes(len(seq.prompt) + seq.params.max_tokens)
            if self.state_bytes() + need > self.max_state_bytes:
                return False
        if seq.leader is not None:
            seq.state = seq.leader.state.clone()
            self.stats["prompt_tokens_shared"] += seq.consumed
            self._detach(seq)
        else:
            hit = self.prefix_cache.lookup(seq.prompt) if self.prefix_cache is not None else None
            if hit is not None:
                tokens, seq.state = hit
                if not seq.output and not seq.suspect:  # a first admission: what the request reused
                    seq.cached_tokens = tokens
                    self.stats["prompt_tokens_cached"] += tokens
            else:
                seq.state = self.model.new_seq_state()
        if seq.cache_marks:
            seq.cache_marks = self.prefix_cache.worth_saving(seq.cache_marks, seq.consumed)
        seq.cache_base, seq.cache_tail = seq.consumed, None
        return True

    def _save_prefixes(self, group: list) -> None:
        """Save the state of every sequence that has just reached one of its cache marks. Past its
        prompt, a sequence whose state cannot be rewound keeps a copy at its reply's last worthwhile
        block boundary, to leave behind when it finishes."""
        cache = self.prefix_cache
        for seq, _ in group:
            if seq.state is None:
                continue
            if seq.cache_marks and seq.consumed == seq.cache_marks[0]:
                mark = seq.cache_marks.pop(0)
                cache.store(seq.prompt[:mark], seq.state)
                seq.cache_base = mark
            elif (not seq.cache_marks and not seq.state.rewindable and seq.consumed > len(seq.prompt)
                  and cache.tail_mark(seq.consumed, seq.cache_base) == seq.consumed):
                seq.cache_tail = (seq.consumed, seq.state.clone())

    def _leave_state(self, seq: Sequence) -> None:
        """A sequence that finished its reply leaves its state in the prefix cache at the reply's last
        block boundary, so the next turn of a chat (prompt + reply + a new message) starts there. A
        KV cache is rewound to the boundary and handed over; a V4 state left its copy on the way."""
        cache, state = self.prefix_cache, seq.state
        if state.rewindable:
            mark = cache.tail_mark(seq.consumed, seq.cache_base)
            if mark is not None and mark > len(seq.prompt):
                state.rewind(mark)
                cache.store(seq.tokens(0, mark), state, copy=False)
        elif seq.cache_tail is not None:
            mark, saved = seq.cache_tail
            cache.store(seq.tokens(0, mark), saved, copy=False)
        seq.cache_tail = None

    @staticmethod
    def _detach(seq: Sequence) -> None:
        if seq.leader is not None:
            seq.leader.followers -= 1
            seq.leader = None

    def _finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        self._detach(seq)
        if self.prefix_cache is not None and reason in ("stop", "length") and seq.state is not None:
            try:
                self._leave_state(seq)
            except Exception:  # the cache is an optimisation: the reply is still delivered
                log.exception("prefix cache: saving the state of request %s failed", seq.request_id)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.state = None  # free the state at once
        seq.cache_tail = None

    # -- the step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one batched forward; return the outputs of the requests that advanced."""
        plan = self.scheduler.schedule(self._admit)
        if not plan:
            return []
        self.stats["steps"] += 1
        logits, samplers = [], []
        outputs: list[RequestOutput] = []
        for group in self._groups(plan):
            try:
                rows, seqs = self._forward(group)
                if seqs:
                    logits.append(self.model.logits(rows).float())
                    samplers.extend(seqs)
            except Exception as e:  # isolate: preempt the call's sequences, fail a suspect that ran alone
                outputs.extend(self._isolate([seq for seq, _ in group], e))
                continue
            for seq, _ in group:
                seq.suspect = False
            if self.prefix_cache is not None:
                self._save_prefixes(group)
        if samplers:
            outputs.extend(self._sample(torch.cat(logits), samplers))
        for out in outputs:
            if out.request_id in self._queues:
                self._queues[out.request_id].append(out)
        return outputs

    def _groups(self, plan: list) -> list[list]:
        """The forward calls of one step: all of it at once, or (batch_invariant) decode rows in calls
        of at most ROW_KERNEL_MAX_ROWS and each prompt chunk alone. Suspects always run alone."""
        alone = [[e] for e in plan if e[0].suspect]
        plan = [e for e in plan if not e[0].suspect]
        if not self.batch_invariant:
            return ([plan] if plan else []) + alone
        decode = [(seq, n) for seq, n in plan if n == 1]
        width = ROW_KERNEL_MAX_ROWS
        return ([decode[i:i + width] for i in range(0, len(decode), width)]
                + [[e] for e in plan if e[1] != 1] + alone)

    def _isolate(self, seqs: list[Sequence], error: Exception) -> list[RequestOutput]:
        """A forward call over `seqs` raised: a suspect that ran alone fails; every other sequence drops
        its (possibly half-written) state and is queued again as a suspect."""
        if len(seqs) == 1 and seqs[0].suspect:
            log.error("request %s failed alone: %s: %s", seqs[0].request_id, type(error).__name__, error,
                      exc_info=error)
            return [self._fail(seqs[0], error)]
        log.warning("a forward call over %d sequence(s) failed (%s: %s); they are recomputed as suspects",
                    len(seqs), type(error).__name__, error)
        for seq in reversed(seqs):  # keep their order at the head of the queue
            seq.state, seq.suspect = None, True
            self.stats["preemptions"] += 1
            self.scheduler.preempt(seq)
        return []

    def _fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        self.scheduler.remove(seq)
        self._finish(seq, "error")
        self.stats["failed_requests"] += 1
        out = self._output(seq, [], "", [])
        out.error = f"{type(error).__name__}: {error}"
        if seq.request_id not in self._queues:
            del self.seqs[seq.request_id]
        return out

    def fail_running(self, error: Exception) -> list[RequestOutput]:
        """Fail every running sequence (a step failed outside any one of them); their final outputs."""
        return [self._fail(seq, error) for seq in list(self.scheduler.running)]

    def _sample(self, logits: torch.Tensor, samplers: list[Sequence]) -> list[RequestOutput]:
        """Sample and append a token for each sequence; one that fails fails alone. A sequence with a
        constraint (structured output) samples from its row with the forbidden tokens masked out."""
        for i, seq in enumerate(samplers):
            if seq.constraint is not None:
                try:
                    seq.constraint.mask_(logits[i])
                except Exception as e:
                    log.error("the output constraint failed for request %s", seq.request_id, exc_info=e)
                    logits[i] = float("nan")  # sampling this row fails: the request fails alone
        try:
            results = sample(logits, [s.params for s in samplers], [s.generator for s in samplers],
                             [s.prompt for s in samplers], [s.output for s in samplers])
        except Exception:  # find the culprit row by row (the others' draws are unaffected)
            results = []
            for i, seq in enumerate(samplers):
                try:
                    results.append(sample(logits[i:i + 1], [seq.params], [seq.generator], [seq.prompt],
                                          [seq.output])[0])
                except Exception as e:
                    log.error("sampling failed for request %s", seq.request_id, exc_info=e)
                    results.append(e)
        outputs = []
        for seq, res in zip(samplers, results):
            if isinstance(res, Exception):
                outputs.append(self._fail(seq, res))
                continue
            try:
                outputs.append(self._append(seq, res))
            except Exception as e:
                log.error("stop handling failed for request %s", seq.request_id, exc_info=e)
                outputs.append(self._fail(seq, e))
        return outputs

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
            if start < len(seq.prompt):
                self.stats["prompt_tokens"] += min(n, len(seq.prompt) - start)
            offset += n
        if self.forward_hook is not None:
            self.forward_hook([s.request_id for s in seqs], [s.consumed for s in seqs], tokens, lengths,
                              [s.request_id for s in self.scheduler.running])
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        wanted = [(k, seq) for k, seq in zip(sample_rows, samplers) if seq.params.return_experts]
        routes = self._watch_routes() if wanted else None
        try:
            streams = None
            if (self.graphs is not None and routes is None and self.forward_hook is None
                    and all(n == 1 for n in lengths)):
                try:
                    streams = self.graphs.decode([s.state for s in seqs], ids)
                except Exception:  # the call's sequences are recomputed (_isolate), eagerly from now on
                    log.exception("a recorded decode step failed; decode steps run eagerly from now on")
                    self.graphs = None
                    raise
                if streams is not None:
                    advance([s.state for s in seqs], lengths)
            if streams is None:
                streams = run_tokens(self.model, ids, [s.state for s in seqs], lengths)
        finally:
            if routes is not None:
                self._unwatch_routes(routes)
        for k, seq in wanted:  # each layer's experts for the row this sequence samples from
            seq.experts = [sorted(layer[k].tolist()) for layer in routes["idx"]]
        self.stats["forward_tokens"] += len(tokens)
        if hasattr(self.model, "experts_read"):
            self.stats["routed_experts_read"] += self.model.experts_read()
        return streams[sample_rows], samplers

    def moe_layers(self) -> list:
        """The model's routed layers (their `on_route` hooks), in order; [] for a dense model."""
        return [layer.ffn for layer in getattr(self.model, "layers", []) if hasattr(layer.ffn, "on_route")]

    def _watch_routes(self) -> dict:
        """Wrap every routed layer's hook for one forward call: `idx` collects each layer's choices."""
        routes = {"idx": [], "prev": []}
        for ffn in self.moe_layers():
            prev = ffn.on_route
            routes["prev"].append((ffn, prev))

            def hook(x, ids, idx, prev=prev):
                if prev is not None:
                    prev(x, ids, idx)
                routes["idx"].append(idx.detach().cpu())
            ffn.on_route = hook
        return routes

    @staticmethod
    def _unwatch_routes(routes: dict) -> None:
        for ffn, prev in routes["prev"]:
            ffn.on_route = prev

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
        if seq.constraint is not None:
            seq.constraint.accept(tok)
        is_eos = tok == self.config.eos_token_id and not p.ignore_eos
        if is_eos or (p.stop_token_ids and tok in p.stop_token_ids):
            reason, stop_reason = "stop", tok
        if seq.detok is not None:
            if reason is None:
                new_text = seq.detok.push(tok)
                if seq.detok.stopped:
                    reason, stop_reason = "stop", seq.detok.stop_reason
            if reason is None and seq.constraint is not None and seq.constraint.finished:
                reason = "stop"  # the grammar admits nothing more
            if reason is None and len(seq.output) >= p.max_tokens:
                reason = "length"
            if reason is not None and not seq.detok.stopped:
                new_text += seq.detok.flush()
            seq.text += new_text
        elif reason is None and seq.constraint is not None and seq.constraint.finished:
            reason = "stop"
        elif reason is None and len(seq.output) >= p.max_tokens:
            reason = "length"
        if reason is not None:
            self.scheduler.remove(seq)
            self._finish(seq, reason, stop_reason)
            if seq.request_id not in self._queues:
                del self.seqs[seq.request_id]
        return self._output(seq, [tok], new_text, lp)

    def _output(self, seq: Sequence, new_ids, new_text, lp) -> RequestOutput:
        experts = None
        if seq.params.return_experts and new_ids:
            experts, seq.experts = [seq.experts], None
        return RequestOutput(seq.request_id, list(new_ids), new_text, list(seq.output), seq.text,
                             seq.status == Status.FINISHED, seq.finish_reason, len(seq.prompt), lp,
                             seq.stop_reason, cached_tokens=seq.cached_tokens, new_experts=experts)

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
               request_id: str | None = None, cache_hints: list[int] = ()) -> Iterator[RequestOutput]:
        """Yield this request's deltas as they are produced; other requests keep running in the same
        steps. Closing the iterator early aborts the request."""
        rid = self.add_request(prompt_token_ids, params, request_id, cache_hints=cache_hints)
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

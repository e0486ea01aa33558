"""Worker extension that records the final hidden state of every token the model runs.

Why: teacher-forced KL needs each scheme's full next-token distribution at every position, and
vLLM returns only top-k ``prompt_logprobs`` (a vocabulary-sized k would turn 8192 floats per token
into Python objects: far too slow). The logits are ``compute_logits(hidden)`` = the LM head applied
to the model's output, so the hidden states (hidden_size values per token, bf16) carry the whole
distribution; the driver applies the same LM head afterwards and checks the result against the
logprobs vLLM itself returned for the actual tokens (``prompt_logprobs=0``).

How: a forward hook on the model (the same module vLLM's runner calls, V1 and V2 runners, CPU and
GPU) keeps ``input_ids``, ``positions`` and the output rows of each step; the runner's
``execute_model`` is wrapped to know how many rows are real scheduled tokens (any padding is cut).
Profiling and warm-up runs happen before :meth:`acc_capture_start` and are not recorded.

:class:`ForcedTokens` (a vLLM logits processor) makes a request's sampled tokens the ones given in
``SamplingParams.extra_args["acc_forced"]``: the decode steps then feed the held-out text one token
at a time (teacher-forced decoding), so decode kernels (query length 1, context only from the 8-bit
cache) are measured too. It changes only the sampled token, never the hidden states recorded.
"""

from __future__ import annotations

from typing import Any

from benchmarks.harness import BenchWorkerExtension
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

EXTENSION_PATH = "benchmarks.accuracy.worker.AccuracyWorkerExtension"
LOGITS_PROCESSOR_PATH = "benchmarks.accuracy.worker:ForcedTokens"
FORCED_KEY = "acc_forced"


class ForcedTokens(AdapterLogitsProcessor):
    """Per request: the i-th sampled token is ``extra_args["acc_forced"][i]`` (others get -inf)."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        forced = (getattr(params, "extra_args", None) or {}).get(FORCED_KEY)
        if not forced:
            return None
        forced = [int(t) for t in forced]

        def force(output_ids: list[int], logits):
            import torch

            i = len(output_ids)
            if i >= len(forced):
                return logits
            out = torch.full_like(logits, float("-inf"))
            out[forced[i]] = 0.0
            return out

        return force


class AccuracyWorkerExtension(BenchWorkerExtension):
    model_runner: Any  # provided by the vLLM worker

    def acc_capture_start(self) -> int:
        if getattr(self, "_acc_capture", None) is not None:
            raise RuntimeError("hidden-state capture is already running on this worker")
        runner = self.model_runner
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        state: dict[str, Any] = {"n": None, "ids": [], "pos": [], "hidden": []}
        original = runner.execute_model

        def execute_model(scheduler_output, *args, **kwargs):
            state["n"] = int(scheduler_output.total_num_scheduled_tokens)
            try:
                return original(scheduler_output, *args, **kwargs)
            finally:
                state["n"] = None

        def hook(_module, args, kwargs, output):
            n = state["n"]
            if not n:
                return None
            ids = kwargs.get("input_ids", args[0] if args else None)
            pos = kwargs.get("positions", args[1] if len(args) > 1 else None)
            hidden = output[0] if isinstance(output, tuple) else output
            if ids is None or pos is None or pos.dim() != 1:
                raise RuntimeError("hidden-state capture needs 1-D input_ids and positions in the model call")
            state["ids"].append(ids[:n].detach().clone())
            state["pos"].append(pos[:n].detach().clone())
            state["hidden"].append(hidden[:n].detach().clone())
            return None

        runner.execute_model = execute_model  # instance attribute: shadows the method until stop
        handle = model.register_forward_hook(hook, with_kwargs=True)
        self._acc_capture = (state, handle, runner)
        return 0

    def acc_capture_stop(self, path: str) -> dict:
        """Stop recording and save ``{input_ids, positions, hidden}`` (CPU tensors) to ``path``."""
        import torch

        capture = getattr(self, "_acc_capture", None)
        if capture is None:
            raise RuntimeError("acc_capture_stop without acc_capture_start")
        state, handle, runner = capture
        handle.remove()
        if "execute_model" in vars(runner):
            del runner.execute_model
        self._acc_capture = None
        if not state["hidden"]:
            raise RuntimeError("the model ran no forward pass while capturing")
        data = {
            "input_ids": torch.cat(state["ids"]).to("cpu", torch.long),
            "positions": torch.cat(state["pos"]).to("cpu", torch.long),
            "hidden": torch.cat(state["hidden"]).to("cpu"),
        }
        torch.save(data, path)
        return {"rows": int(data["hidden"].shape[0]), "steps": len(state["hidden"]), "dtype": str(data["hidden"].dtype)}

"""An lm-evaluation-harness model for megacpt checkpoints: `--model megacpt --model_args checkpoint=DIR`.

Importing this module registers the model under the name "megacpt" (lm-eval does not discover plugins on
its own); `megacpt lm-eval` does that for you, and `python -m megacpt.evaluation.lm_eval_adapter ARGS` is lm-eval's
own command line with the model registered. The checkpoint's weights (every tensor-parallel shard, merged)
run in this process at TP 1 on the machine's device, with the tokenizer its state names. Requests are
scored as lm-eval's `hf` model scores them (context and continuation encoded together and split, left
truncation to seq_length, log-softmax over the real vocabulary), so both give the same numbers for the
same weights. Generation is greedy only, one full forward pass per new token (no KV cache).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from megacpt.errors import UserError
from megacpt.weights import checkpoint_io


@register_model("megacpt")
class MegacptLM(TemplateLM):
    """lm-eval's LM interface over a megacpt checkpoint (loglikelihood, rolling loglikelihood, greedy generation)."""

    def __init__(self, checkpoint: str, batch_size: int | str = 1, max_gen_toks: int = 256, device: str | None = None,
                 max_batch_size: int | None = None):
        """lm-eval passes `device` and `max_batch_size` to every model.

        The device is the world's (CUDA when present)."""
        from megacpt.runtime.distributed import setup_world

        super().__init__()
        source = checkpoint_io.load(checkpoint, key="checkpoint")
        self.text_tokenizer = checkpoint_io.checkpoint_tokenizer(source.state)
        if self.text_tokenizer is None:
            raise UserError(f"checkpoint {source.tag_dir} names no tokenizer; lm-eval tasks are text and need one")
        self.config = source.model
        world = setup_world(1, seed=0)
        if device is not None and torch.device(device).type != world.device.type:  # lm-eval's CLI defaults to cuda:0
            logging.getLogger(__name__).warning("device '%s' ignored: megacpt runs on %s here", device, world.device)
        self._device = world.device
        self.model = checkpoint_io.build_model(self.config, source.weights, 1, 0, world.device)
        if str(batch_size).startswith("auto"):
            raise UserError("batch_size 'auto' is not supported by the megacpt model; give a number")
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.text_tokenizer.eod_id

    @property
    def max_length(self) -> int:
        return self.config.seq_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.text_tokenizer.encode(string)

    @torch.no_grad()
    def log_probs(self, sequences: list[list[int]]) -> torch.Tensor:
        """[batch, longest, vocab] next-token log-probabilities (float32) of right-padded sequences."""
        longest = max(len(s) for s in sequences)
        ids = torch.tensor([s + [self.eot_token_id] * (longest - len(s)) for s in sequences], device=self._device)
        positions = torch.arange(longest, device=self._device).unsqueeze(0).expand_as(ids)
        logits = self.model(ids, positions, None)[..., : self.config.vocab_size]
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives the continuation)."""
        results = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            inputs = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in chunk]
            for row, inp, (key, _, continuation) in zip(self.log_probs(inputs), inputs, chunk):
                scores = row[len(inp) - len(continuation):len(inp)]
                target = torch.tensor(continuation, device=scores.device)
                answer = (float(scores.gather(1, target[:, None]).sum()), bool((scores.argmax(-1) == target).all()))
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents in disjoint windows of seq_length tokens, as lm-eval's `hf` model."""
        results = []
        for (text,) in (request.args for request in requests):
            windows = [(None, *utils.make_disjoint_window(w)) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(score for score, _ in self._loglikelihood_tokens(windows))
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut at the first stop sequence (and at the end-of-document token)."""
        results = []
        eod_text = self.text_tokenizer.decode([self.eot_token_id])
        for context, gen_kwargs in (request.args for request in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise UserError(f"the megacpt model decodes greedily only; the task asks for sampling ({gen_kwargs})")
            until = handle_stop_sequences(kwargs["until"], eos=eod_text)
            max_new = kwargs["max_gen_toks"]
            if max_new >= self.max_length:
                raise UserError(f"max_gen_toks {max_new} leaves no room for a context within seq_length "
                                f"{self.max_length}")
            ids = self.tok_encode(context)[-(self.max_length - max_new):]
            new = self.greedy(ids, max_new, until)
            text = postprocess_generated_text(self.text_tokenizer.decode(new), stop=until, think_end_token=None)
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results

    def greedy(self, ids: list[int], max_new: int, until: list[str]) -> list[int]:
        """Up to `max_new` argmax tokens after `ids`, stopping at the EOD token or once a stop sequence appears."""
        new: list[int] = []
        while len(new) < max_new:
            token = int(self.log_probs([ids + new])[0, -1].argmax())
            if token == self.eot_token_id:
                break
            new.append(token)
            if any(stop and stop in self.text_tokenizer.decode(new) for stop in until):
                break
        return new


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()

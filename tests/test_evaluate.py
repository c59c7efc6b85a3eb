"""Validation loss: the mean over every scored token of the first train.eval_samples samples, whatever the
micro-batch size, computed here sample by sample without megacpt's evaluation code."""
import torch

from megacpt.config import DataConfig, ModelConfig
from megacpt.data.datasets import build_validation_datasets
from megacpt.model.gpt import build_gpt
from megacpt.train.validation import validation_losses


def test_validation_loss_is_the_token_mean_over_the_first_samples(tmp_path, pattern_data, world):
    data = DataConfig(sources=[{"name": "a", "prefix": pattern_data["a"]}],
                      validation=[{"name": "noise", "prefix": pattern_data["noise"]}])
    dataset = build_validation_datasets(data, 5, 64, str(tmp_path / "cache"), 256, None)["noise"]
    torch.manual_seed(0)
    model = build_gpt(ModelConfig(preset="tiny"), 256).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(5):  # one sample at a time: cross entropy of each scored token's label
            sample = dataset[i]
            tokens, labels = torch.as_tensor(sample["tokens"])[None], torch.as_tensor(sample["labels"])
            logits = model(tokens, torch.arange(64)[None], None)[0, :, :256]
            per_token = torch.nn.functional.cross_entropy(logits.double(), labels, reduction="none")
            mask = torch.as_tensor(sample["loss_mask"]).double()
            total, count = total + (per_token * mask).sum().item(), count + int(mask.sum().item())
    for micro_batch_size in (1, 2, 5, 8):  # 5 samples in micro-batches that do and do not divide them
        losses, tokens = validation_losses(model, {"noise": dataset}, 5, micro_batch_size, 0, 1, torch.device("cpu"))
        assert tokens == {"noise": count} and count == 5 * 64
        assert abs(losses["noise"] - total / count) < 1e-5, (micro_batch_size, losses, total / count)

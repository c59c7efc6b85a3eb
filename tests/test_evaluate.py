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
    at = torch.zeros(64, dtype=torch.float64)  # loss summed over the samples at each position
    with torch.no_grad():
        for i in range(5):  # one sample at a time: cross entropy of each scored token's label
            sample = dataset[i]
            tokens, labels = torch.as_tensor(sample["tokens"])[None], torch.as_tensor(sample["labels"])
            logits = model(tokens, torch.arange(64)[None], None)[0, :, :256]
            per_token = torch.nn.functional.cross_entropy(logits.double(), labels, reduction="none")
            mask = torch.as_tensor(sample["loss_mask"]).double()
            total, count = total + (per_token * mask).sum().item(), count + int(mask.sum().item())
            at += per_token * mask
    for micro_batch_size in (1, 2, 5, 8):  # 5 samples in micro-batches that do and do not divide them
        losses, tokens, by_position = validation_losses(model, {"noise": dataset}, 5, micro_batch_size, 0, 1,
                                                        torch.device("cpu"))
        assert tokens == {"noise": count} and count == 5 * 64 and by_position == {}
        assert abs(losses["noise"] - total / count) < 1e-5, (micro_batch_size, losses, total / count)
    for bucket, names in ((16, ["0-15", "16-31", "32-47", "48-63"]), (24, ["0-23", "24-47", "48-63"])):
        _, _, by_position = validation_losses(model, {"noise": dataset}, 5, 2, 0, 1, torch.device("cpu"), None, bucket)
        assert list(by_position["noise"]) == names
        for name, loss in by_position["noise"].items():
            first, last = map(int, name.split("-"))
            assert abs(loss - at[first:last + 1].sum().item() / (5 * (last + 1 - first))) < 1e-5, name

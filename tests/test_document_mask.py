"""Document masking (data.document_mask): a packed sample's documents computed as if each ran alone."""
import numpy as np
import pytest
import torch

from megacpt.config import ModelConfig
from megacpt.data.datasets import SourceStream
from megacpt.data.loader import collate
from megacpt.model.attention import document_attention_mask
from megacpt.model.gpt import build_gpt
from megacpt.train.validation import token_losses

from datagen import read_metrics, tiny_config, write_config, write_indexed

SEQ = 64
STRIDE = 1000  # token = STRIDE * document + position in the document: both readable from the token alone


@pytest.fixture(scope="module")
def numbered(tmp_path_factory) -> str:
    """60 documents of 5 to 90 tokens whose every token says which document and which position it is."""
    rng = np.random.default_rng(3)
    docs = [[STRIDE * d + j for j in range(int(n))] for d, n in enumerate(rng.integers(5, 90, 60))]
    return write_indexed(tmp_path_factory.mktemp("numbered") / "docs", docs)


def stream(prefix, tmp_path, document_mask: bool) -> SourceStream:
    return SourceStream(prefix, 40, SEQ, 1234, str(tmp_path / "cache"), 65536, None, document_mask=document_mask)


def test_samples_carry_their_documents_and_boundary_losses(numbered, tmp_path, world):
    plain = stream(numbered, tmp_path, False)
    laid = stream(numbered, tmp_path, True)
    boundaries = 0
    for i in range(40):
        sample, base = laid[i], plain[i]
        tokens = sample["tokens"].numpy()
        window = np.append(tokens, sample["labels"].numpy()[-1])
        doc = window // STRIDE
        # document numbers change exactly where the token's own document changes
        ids = sample["document_ids"].numpy()
        assert ((np.diff(ids) != 0) == (np.diff(doc[:-1]) != 0)).all()
        new_doc = doc[1:] != doc[:-1]
        assert (window[1:][new_doc] % STRIDE == 0).all()  # a label that starts a document is its position 0
        assert (sample["loss_mask"].numpy() == ~new_doc).all()
        boundaries += new_doc.sum()
        assert (sample["tokens"] == base["tokens"]).all() and (sample["labels"] == base["labels"]).all()
        assert "document_ids" not in base and base["loss_mask"].all()
    assert boundaries > 40  # most samples hold several documents


def test_the_mask_is_block_diagonal_and_causal():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2]])
    allowed = ~document_attention_mask(ids)[0, 0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for a, b in ((0, 3), (3, 5), (5, 6)):
        expected[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    assert (allowed == expected).all()


def documents_alone(model, sample: dict) -> tuple[torch.Tensor, float]:
    """Logits of each document of a packed sample run alone at positions 0, 1, ..., concatenated, and the sum of
    the documents' own next-token losses."""
    ids = sample["document_ids"]
    logits, loss = [], 0.0
    for d in torch.unique_consecutive(ids):
        where = torch.nonzero(ids == d).flatten()
        tokens = sample["tokens"][where][None]
        out = model(tokens, torch.arange(len(where))[None], None)
        logits.append(out[0])
        if len(where) > 1:  # the document's own labels: every token after its first
            loss += torch.nn.functional.cross_entropy(out[0, :-1], tokens[0, 1:], reduction="sum").item()
        if where[-1] == SEQ - 1 and sample["labels"][-1] // STRIDE == tokens[0, -1] // STRIDE:  # the window's extra
            loss += torch.nn.functional.cross_entropy(out[0, -1:], sample["labels"][-1:], reduction="sum").item()
    return torch.cat(logits), loss


@pytest.mark.parametrize("family", [{}, {"family": "llama", "num_query_groups": 2},
                                    {"family": "qwen2", "num_query_groups": 1}])
def test_packed_logits_with_the_mask_equal_each_document_run_alone(numbered, tmp_path, world, family):
    torch.manual_seed(0)
    model = build_gpt(ModelConfig(preset="tiny", vocab_size=65536, num_layers=2, **family), 65536).eval()
    with torch.no_grad():
        for param in model.parameters():  # norms and biases too, not only the randomly initialised matrices
            param.add_(0.05 * torch.randn_like(param))
    laid = stream(numbered, tmp_path, True)
    samples = [laid[i] for i in range(2)]
    mb = collate(samples, torch.device("cpu"))
    with torch.no_grad():
        packed = model(mb["tokens"], mb["position_ids"], document_attention_mask(mb["document_ids"]))
        unmasked = model(mb["tokens"], mb["position_ids"], None)
        total, count = token_losses(model, mb)
        alone = [documents_alone(model, s) for s in samples]
    for b, (logits, _) in enumerate(alone):
        assert (packed[b] - logits).abs().max().item() <= 1e-5
    assert (unmasked - packed).abs().max().item() > 1e-2  # the mask matters: without it documents see each other
    assert abs(total.item() - sum(loss for _, loss in alone)) <= 1e-3
    assert count.item() == mb["loss_mask"].sum().item() < 2 * SEQ


def test_training_with_document_masking_feeds_the_loop_masked_batches(tmp_path, pattern_data, world, monkeypatch):
    from megacpt.cli import main
    from megacpt.train import loop as train

    seen, real = [], train.micro_batch_loss
    monkeypatch.setattr(train, "micro_batch_loss", lambda model, mb: seen.append(mb) or real(model, mb))
    config = tiny_config(tmp_path / "run", [{"name": "a", "prefix": pattern_data["a"]}],
                         data={"document_mask": True}, train={"steps": 3})
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 0
    assert len(seen) == 6 and all("document_ids" in mb for mb in seen)
    crossing = [mb for mb in seen if (mb["document_ids"] > 0).any()]  # documents of 100 tokens, samples of 64
    for mb in crossing:  # no loss where a label starts a document (the window's extra label may start one too)
        extra = (mb["loss_mask"] == 0).sum(1) - (mb["document_ids"].diff() != 0).sum(1)
        assert ((extra == 0) | (extra == 1)).all()
        assert (mb["loss_mask"][:, :-1] == (mb["document_ids"].diff() == 0)).all()
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run") if "loss" in r)

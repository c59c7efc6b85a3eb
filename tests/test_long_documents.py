"""Per-source long-document upsampling: more tokens of long documents in a source's samples, same blend."""
import numpy as np
import pytest

from megacpt.config import validate_config
from megacpt.data.datasets import SourceStream, build_train_dataset
from megacpt.errors import ConfigError

from datagen import tiny_config, write_indexed

SEQ = 64
LONG, SHORT = 200, 20  # tokens of the long and the short documents; long ones are written with ids below 100


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> str:
    """30 long documents (ids 0-99) and 200 short ones (ids 100-199), interleaved: 6,000 long tokens of 10,000."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100, LONG).tolist() for _ in range(30)] + \
           [rng.integers(100, 200, SHORT).tolist() for _ in range(200)]
    order = rng.permutation(len(docs))
    return write_indexed(tmp_path_factory.mktemp("mixed") / "docs", [docs[i] for i in order])


def token_share(stream: SourceStream, n: int) -> float:
    """Share of long-document tokens in samples 0..n-1, read from the tokens themselves (window of SEQ + 1)."""
    windows = [np.append(s["tokens"].numpy(), s["labels"].numpy()[-1]) for s in (stream[i] for i in range(n))]
    return float(np.mean(np.concatenate(windows) < 100))


def test_a_boost_raises_the_long_document_share_to_the_upsampled_epochs(mixed, tmp_path, world):
    cache = str(tmp_path / "cache")
    plain = SourceStream(mixed, 1, SEQ, 1234, cache, 256, None)
    doubled = SourceStream(mixed, 1, SEQ, 1234, cache, 256, None, boost=(2, SHORT))  # same cache, own indices
    boosted = SourceStream(mixed, 1, SEQ, 1234, cache, 256, None, boost=(4, SHORT))
    for stream, long_tokens, epoch_tokens in ((plain, 6000, 10000), (doubled, 12000, 16000), (boosted, 24000, 28000)):
        n = stream.epoch_size
        assert n == (epoch_tokens - 1) // SEQ  # an epoch holds every (repeated) document once
        measured = stream.long_token_share(0, n, SHORT)
        assert measured == pytest.approx(token_share(stream, n), abs=1e-12)  # the index agrees with the tokens
        assert measured == pytest.approx(long_tokens / epoch_tokens, abs=0.02)
    assert boosted.long_token_share(0, 40, SHORT) > plain.long_token_share(0, 40, SHORT) + 0.15


def test_a_boost_leaves_every_batchs_sources_unchanged(mixed, pattern_data, tmp_path, world):
    def stream(boost: int):
        sources = [{"name": "mixed", "prefix": mixed, "weight": 0.7, "long_document_boost": boost},
                   {"name": "a", "prefix": pattern_data["a"], "weight": 0.3}]
        config = validate_config(tiny_config(tmp_path / "run", sources, data={"long_document_tokens": SHORT}))
        return build_train_dataset(config.data, 200, 10, SEQ, str(tmp_path / "cache"), 256, None)

    plain, boosted = stream(1), stream(3)
    assert [plain.source_of(p) for p in range(200)] == [boosted.source_of(p) for p in range(200)]
    assert plain.samples_per_source(200) == boosted.samples_per_source(200) == {"mixed": 140, "a": 60}
    from_a = [p for p in range(200) if plain.source_of(p) == "a"]
    assert all((plain[p]["tokens"] == boosted[p]["tokens"]).all() for p in from_a)  # other sources untouched
    assert plain.sources[0].long_token_share(0, 140, SHORT) < boosted.sources[0].long_token_share(0, 140, SHORT)


def test_a_boost_needs_the_long_document_threshold(tmp_path):
    config = tiny_config(tmp_path / "run", [{"name": "x", "prefix": "x", "long_document_boost": 2}])
    with pytest.raises(ConfigError, match="long_document_tokens") as error:
        validate_config(config)
    assert error.value.key == "data"
    with pytest.raises(ConfigError, match="continued or replayed seen-only"):
        validate_config({**config, "data": {**config["data"], "long_document_tokens": 8, "continue_sources": True}})


def test_the_stage_start_record_reports_each_sources_long_document_share(mixed, pattern_data, tmp_path):
    from megacpt.cli import main

    from datagen import read_metrics, write_config

    def share(boost: int, name: str) -> dict:
        sources = [{"name": "mixed", "prefix": mixed, "long_document_boost": boost},
                   {"name": "a", "prefix": pattern_data["a"]}]
        config = tiny_config(tmp_path / name, sources, data={"long_document_tokens": SHORT},
                             train={"steps": 3, "global_batch_size": 40, "micro_batch_size": 20})
        assert main(["train", write_config(tmp_path / f"{name}.json", config)]) == 0
        start = next(r for r in read_metrics(tmp_path / name) if r.get("event") == "stage_start")
        return start["long_document_share"]

    plain, boosted = share(1, "plain"), share(4, "boosted")
    assert plain["a"] == boosted["a"] == 1.0  # every document of 'a' (100 tokens) is longer than 20
    assert boosted["mixed"] > plain["mixed"] + 0.1

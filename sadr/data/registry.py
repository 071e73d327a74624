"""The dataset formats by `dataset.name`: how each parses a record, and where its canonical copy lives.

Sizes and sha256 are those published in the project's data notes; a format whose file has no
known checksum is downloaded unverified unless `dataset.sha256` / `dataset.size` are set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sadr.conf.schema import DatasetConfig
from sadr.data import counterfact, knowedit, offline_counterfact, sadr_merged, zsre
from sadr.data.download import ROME_DATA_URL, RemoteFile
from sadr.data.records import EditCase
from sadr.data.validation import Record


@dataclass(frozen=True)
class DatasetFormat:
    """`remote`: canonical download; `packaged`: a file shipped inside the `sadr.data` package instead; `reads_target`:
    whether `dataset.target` chooses the edit's target (zsRE's two protocols, which a run's title must name)."""

    parse: Callable[[Record, DatasetConfig], EditCase]
    remote: RemoteFile | None = None
    packaged: str | None = None
    reads_target: bool = False


FORMATS: dict[str, DatasetFormat] = {
    "counterfact": DatasetFormat(
        counterfact.parse,
        RemoteFile(
            ROME_DATA_URL + "counterfact.json",
            size=45_108_470,
            sha256="d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f",
        ),
    ),
    "multi_counterfact": DatasetFormat(
        counterfact.parse, RemoteFile("https://memit.baulab.info/data/dsets/multi_counterfact.json")
    ),
    "offline_counterfact": DatasetFormat(offline_counterfact.parse, packaged="offline/counterfact_offline.json"),
    "zsre": DatasetFormat(zsre.parse, RemoteFile(ROME_DATA_URL + "zsre_mend_eval.json"), reads_target=True),
    "knowedit_counterfact": DatasetFormat(
        knowedit.parse,
        RemoteFile(
            "https://huggingface.co/datasets/zjunlp/KnowEdit/resolve/main/benchmark/wiki_counterfact/test_cf.json"
        ),
    ),
    "sadr_merged": DatasetFormat(
        sadr_merged.parse,
        RemoteFile(
            "https://raw.githubusercontent.com/PinzhengWang322/Reveal_Attention_Drift/HEAD/data/merged_counterfact.json",
            size=3_746_414,
            sha256="39ba477f5a69989e7b8b856a72f67f533893c7d0e6944437fec800af99392f83",
        ),
    ),
}

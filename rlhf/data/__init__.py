"""Data contracts, their readers and writers, and rankings → pairs."""

from rlhf.data.io import dataset_to_records, iter_jsonl, read_records, records_to_dataset, write_records
from rlhf.data.pairs import PairStats, load_pairs, ranking_to_pairs, rankings_to_pairs
from rlhf.data.records import CompletionsRecord, PairRecord, PromptRecord, RankingRecord, SFTRecord

__all__ = [
    "CompletionsRecord", "PairRecord", "PairStats", "PromptRecord", "RankingRecord", "SFTRecord",
    "dataset_to_records", "iter_jsonl", "load_pairs", "ranking_to_pairs", "rankings_to_pairs",
    "read_records", "records_to_dataset", "write_records",
]

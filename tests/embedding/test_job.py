"""Pieces of mec_hub/embedding/job.py on their own (mutants that survived the first mutation pass)."""

from __future__ import annotations

import pytest

from mec_hub.embedding.checkpoint import ResumeError
from mec_hub.embedding.job import _agreed, result_digest
from mec_hub.embedding.outputs import OutputError


class Group:
    """A process group whose other processes report ``others`` (an error string or None)."""

    def __init__(self, *others: str | None) -> None:
        self.others = others

    def all_gather(self, value):
        return [value, *self.others]


def fail(error: Exception):
    def step():
        raise error

    return step


@pytest.mark.parametrize("error_class", [ResumeError, OutputError])
def test_a_failure_keeps_its_class_and_whole_message_on_every_process(error_class):
    message = "cannot resume the unfinished run into f.npy: the inputs changed; pass --overwrite"
    with pytest.raises(error_class) as caught:
        _agreed(Group(None), fail(error_class(message)))
    assert type(caught.value) is error_class and str(caught.value) == message
    # a process whose own step succeeded raises the first failure reported by the others
    with pytest.raises(error_class) as caught:
        _agreed(Group(f"{error_class.__name__}\0{message}"), lambda: 1)
    assert type(caught.value) is error_class and str(caught.value) == message
    assert _agreed(Group(None, None), lambda: 7) == 7


def test_the_result_digest_ignores_the_number_of_processes_only():
    fingerprint = {"inputs_sha256": "ab", "batch_size": 4, "world_size": 1}
    assert result_digest(fingerprint) == result_digest({**fingerprint, "world_size": 2})
    assert result_digest(fingerprint) != result_digest({**fingerprint, "batch_size": 8})

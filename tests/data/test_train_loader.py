"""The resumable training loader: how the batches of several processes make up one process's."""

from training_runs import positioned_batches


def test_processes_share_out_the_single_process_batches():
    single = positioned_batches(1, 0, 4)
    shards = [positioned_batches(2, r, 2) for r in range(2)]
    for i, batch in enumerate(single):
        # The same images at the same positions (so with the same augmentation) in iteration i.
        assert sorted(shards[0][i] + shards[1][i]) == sorted(batch)
    positions = [p for batch in single for p, _ in batch]
    assert positions == list(range(len(positions)))  # positions in the global sequence

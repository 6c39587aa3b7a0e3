using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine.Tests;

/// <summary>
/// Found by the model test (seed 2093020933, 4000 steps): a replica that failed a write and then
/// applied a flush already queued behind it records the write's extent as flushed — the same
/// (generation, flush number) the healthy replicas record — so on its return the extent is not
/// copied, and the replica keeps the old block under a hash that matches it: silent divergence
/// that a read served from that replica returns as good data. A real downstairs behaves like the
/// fake here: it marks an extent dirty before the write reaches the file, a failed pwrite does
/// not poison it, and the next flush stamps every dirty extent.
/// </summary>
[CancelAfter(30_000)]
public sealed class FailedWriteRepairTests
{
    private const long Block = 94;

    [Test]
    [Category("ModelFinding")]
    public async Task A_write_that_failed_on_one_replica_is_repaired_there_even_when_a_flush_queued_behind_it_succeeded()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        await cluster.WriteAsync(Block, seed: 1);
        await cluster.FlushAsync();
        await cluster.WriteAsync(Block, seed: 2); // the extent is dirty everywhere, not yet flushed

        // Replica 1 fails the next write (a failing disk) and applies the flush sent right behind it,
        // both before the upstairs has seen the error: the replies are still on their way.
        int flushesBefore = cluster.Replicas[1].Received.Count(op => op.Kind == OpKind.Flush);
        cluster.Replicas[1].HoldReplies();
        cluster.Replicas[1].FailWritesWith = ResultCode.IoError;
        Task write = cluster.WriteAsync(Block, seed: 3);
        await Cluster.WaitUntilAsync(() => cluster.Replicas[1].Received.Count(op => op.Kind == OpKind.Write && op.FirstBlock == Block) == 3,
            "replica 1 received the third write");
        Task flush = cluster.FlushAsync();
        await Cluster.WaitUntilAsync(() => cluster.Replicas[1].Received.Count(op => op.Kind == OpKind.Flush) > flushesBefore,
            "replica 1 received the flush behind the write");
        await Cluster.WaitUntilAsync(() => !cluster.Replicas[1].Meta((int)(Block / Cluster.ExtentBlocks)).Dirty,
            "replica 1 applied the flush");
        // It comes back only after the guest's write and flush finished (a restart takes a moment).
        cluster.Replicas[1].Reachable = false;
        cluster.Replicas[1].Release();
        await Task.WhenAll(write, flush).WaitAsync(Cluster.Patience);

        cluster.Replicas[1].FailWritesWith = null;
        // The error reaches the upstairs after the other two acked: wait for the fault it causes,
        // then let the replica back for its reconnect and repair.
        await Cluster.WaitUntilAsync(() => cluster.Status(1).Faults >= 1, "replica 1 is faulted by its failed write");
        cluster.Replicas[1].Reachable = true;
        await cluster.WaitForAllActiveAsync();
        await cluster.FlushAsync();
        await cluster.WaitForIdleAsync();

        byte[] expected = Cluster.Pattern(3, Block);
        Assert.Multiple(() =>
        {
            for (int r = 0; r < 3; r++)
            {
                Assert.That(cluster.Replicas[r].ReadBlock(Block), Is.EqualTo(expected), $"replica {r}'s block {Block} holds the acknowledged write");
            }
        });
    }
}

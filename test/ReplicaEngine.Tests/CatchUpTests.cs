using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine.Tests;

/// <summary>The changed-block record: a returning replica gets what it missed, not every extent it touched.</summary>
[CancelAfter(45_000)]
public sealed class CatchUpTests
{
    private static long Block(int extent, int offset = 0) => ((long)extent * Cluster.ExtentBlocks) + offset;

    private static EngineOptions BlockGranules(long maxBytes = 16L << 30) =>
        Cluster.Options() with { ChangeRecordGranuleBytes = Cluster.BlockSize, ChangeRecordMaxBytes = maxBytes };

    private static async Task<FakeReplica> TakeAwayAsync(Cluster cluster)
    {
        FakeReplica away = cluster.Replicas[2];
        away.Reachable = false;
        away.DropConnection();
        await cluster.WriteAsync(Block(0, 0), 1); // finds the connection gone: replica 2 is faulted
        await Cluster.WaitUntilAsync(() => cluster.Status(2).State == ReplicaState.Faulted, "replica 2 is out");
        return away;
    }

    [Test]
    public async Task A_returning_replica_gets_only_the_blocks_it_missed_written_in_place()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync(BlockGranules());
        for (int e = 0; e < Cluster.ExtentCount; e++)
        {
            await cluster.WriteAsync(Block(e), 100 + e, blocks: Cluster.ExtentBlocks);
        }
        await cluster.FlushAsync();
        FakeReplica away = await TakeAwayAsync(cluster); // missed block 0
        await cluster.WriteAsync(Block(3, 2), 3, blocks: 2);
        await cluster.FlushAsync();
        await cluster.WriteAsync(Block(7, 5), 7);
        await cluster.WriteAsync(Block(7, 5), 8); // the same block twice: copied once
        Assert.That(cluster.Status(2).ChangeRecordBytes, Is.EqualTo(4 * Cluster.BlockSize), "the record marks the four blocks missed");

        away.Reachable = true;
        await cluster.WaitForStateAsync(2, ReplicaState.Active);

        Assert.That(away.InPlaceBlocksWritten, Is.EqualTo(4), "blocks copied: exactly those written while it was away");
        Assert.That(cluster.Status(2).RepairBytesCopied, Is.EqualTo(4 * Cluster.BlockSize));
        Assert.That(cluster.Log.Warnings.Where(w => w.Contains("changed-block record dropped", StringComparison.Ordinal)), Is.Empty);
        await cluster.FlushAsync();
        await cluster.WaitForIdleAsync();
        cluster.AssertReplicasIdentical();
    }

    [Test]
    public async Task A_record_that_outgrows_its_limit_is_dropped_with_one_line_and_the_repair_copies_whole_extents()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync(BlockGranules(maxBytes: 3 * Cluster.BlockSize));
        FakeReplica away = await TakeAwayAsync(cluster);
        for (int e = 1; e < 6; e++)
        {
            await cluster.WriteAsync(Block(e, 1), e); // the third mark past the first overflows the record
        }
        Assert.That(cluster.Status(2).ChangeRecordBytes, Is.Null, "no record any more");

        away.Reachable = true;
        await cluster.WaitForStateAsync(2, ReplicaState.Active);

        Assert.That(cluster.Log.Warnings.Count(w => w.Contains("changed-block record dropped", StringComparison.Ordinal)), Is.EqualTo(1), "one line says so");
        Assert.That(away.InPlaceBlocksWritten, Is.Zero, "nothing copied in place");
        Assert.That(cluster.Status(2).RepairBytesCopied, Is.GreaterThanOrEqualTo(6L * Cluster.ExtentBytes), "the six written extents copied whole");
        await cluster.FlushAsync();
        await cluster.WaitForIdleAsync();
        cluster.AssertReplicasIdentical();
    }

    [Test]
    public async Task An_extent_the_replica_reports_uncertain_is_copied_whole_even_with_a_record()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync(BlockGranules());
        FakeReplica away = await TakeAwayAsync(cluster);
        await cluster.WriteAsync(Block(5, 1), 5);
        // As after a machine crash: the downstairs cannot vouch for extent 5's unsynced blocks.
        away.SetExtent(5, 0xEE, new ExtentMeta(1, 0, Dirty: true, Uncertain: true));

        away.Reachable = true;
        await cluster.WaitForStateAsync(2, ReplicaState.Active);

        Assert.That(away.InPlaceBlocksWritten, Is.EqualTo(1), "block 0, missed, copied in place");
        await cluster.FlushAsync();
        await cluster.WaitForIdleAsync();
        cluster.AssertReplicasIdentical();
    }
}

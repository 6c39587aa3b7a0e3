using Microsoft.Extensions.Time.Testing;
using NbdServer.Common.Volumes;

namespace NbdServer.ReplicaEngine.Tests;

[CancelAfter(45_000)]
public sealed class RecoveryTests
{
    private static int[] CommittedExtents(FakeReplica replica) =>
        [.. replica.Received.Where(o => o.Kind == OpKind.ExtentCommit).Select(o => (int)(o.FirstBlock / Cluster.ExtentBlocks)).Order()];

    private static long Block(int extent, int offset = 0) => ((long)extent * Cluster.ExtentBlocks) + offset;

    [Test]
    public async Task A_briefly_disconnected_replica_gets_exactly_the_extents_it_missed_or_that_are_unflushed()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        FakeReplica away = cluster.Replicas[2];
        for (int e = 0; e < 3; e++)
        {
            await cluster.WriteAsync(Block(e), e + 1);
        }
        await cluster.FlushAsync();
        await cluster.WriteAsync(Block(4, 3), 4); // on all three, not flushed yet
        await cluster.WaitForIdleAsync();

        away.Reachable = false;
        away.DropConnection();
        await cluster.WriteAsync(Block(6, 1), 6); // finds the connection gone: replica 2 is faulted
        await Cluster.WaitUntilAsync(() => cluster.Status(2).State == ReplicaState.Faulted, "replica 2 is out");
        await cluster.WriteAsync(Block(9, 7), 9);
        await cluster.FlushAsync();
        await cluster.WriteAsync(Block(11, 2), 11); // written while away, after the last flush
        away.ClearReceived();

        away.Reachable = true;
        await cluster.WaitForStateAsync(2, ReplicaState.Active);

        Assert.That(CommittedExtents(away), Is.EqualTo(new[] { 4, 6, 9, 11 }), "extents copied to the returning replica");
        Assert.That(cluster.Status(2).RepairDone, Is.EqualTo(4));
        Assert.That(cluster.Status(2).RepairTotal, Is.EqualTo(4));
        Assert.That(cluster.Replicas[0].Received.Count(o => o.Kind == OpKind.ExtentCommit), Is.Zero, "nothing copied to the healthy replicas");
        await cluster.FlushAsync();
        cluster.AssertReplicasIdentical();
    }

    [Test]
    public async Task Live_repair_lets_guest_IO_continue_and_ends_with_three_identical_replicas()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync(Cluster.Options() with { RepairDutyCycle = 0.01, IdleRepairDutyCycle = 0.01, RepairMaxPause = TimeSpan.FromMilliseconds(100) });
        FakeReplica away = cluster.Replicas[1];
        var model = new byte[Cluster.ExtentCount * Cluster.ExtentBytes];
        for (int e = 0; e < Cluster.ExtentCount; e++)
        {
            await cluster.WriteAsync(Block(e), e, blocks: Cluster.ExtentBlocks);
            Cluster.Pattern(e, Block(e), Cluster.ExtentBlocks).CopyTo(model, e * Cluster.ExtentBytes);
        }
        await cluster.FlushAsync();
        away.Reachable = false;
        away.DropConnection();
        // Everything is rewritten while replica 1 is away: every extent needs repair.
        for (int e = 0; e < Cluster.ExtentCount; e++)
        {
            await cluster.WriteAsync(Block(e, 1), 100 + e, blocks: 2);
            Cluster.Pattern(100 + e, Block(e, 1), 2).CopyTo(model, (e * Cluster.ExtentBytes) + Cluster.BlockSize);
        }
        await cluster.FlushAsync();
        Assert.That(cluster.Status(1).State, Is.EqualTo(ReplicaState.Faulted));

        // Repair is slow (each copy is followed by a pause) so guest IO overlaps it.
        away.Reachable = true;
        await cluster.WaitForStateAsync(1, ReplicaState.Repairing);

        int writesDuringRepair = 0;
        int seed = 1000;
        var random = new Random(42);
        while (cluster.Status(1).State == ReplicaState.Repairing)
        {
            long block = random.Next(0, (int)(Cluster.ExtentCount * Cluster.ExtentBlocks) - 2);
            int blocks = random.Next(1, 3);
            await cluster.WriteAsync(block, ++seed, blocks);
            Cluster.Pattern(seed, block, blocks).CopyTo(model, (int)(block * Cluster.BlockSize));
            if (seed % 5 == 0)
            {
                long at = random.Next(0, (int)(Cluster.ExtentCount * Cluster.ExtentBlocks));
                Assert.That(await cluster.ReadAsync(at), Is.EqualTo(model.AsSpan((int)(at * Cluster.BlockSize), Cluster.BlockSize).ToArray()), $"read of block {at} during repair");
            }
            if (seed % 17 == 0)
            {
                await cluster.FlushAsync();
            }
            if (cluster.Status(1).State == ReplicaState.Repairing)
            {
                writesDuringRepair++;
            }
            // The fakes answer inline, so without this the loop never leaves its thread: the repair's
            // continuations queued behind it waited minutes for a thread of the pool.
            await Task.Yield();
        }
        await cluster.WaitForStateAsync(1, ReplicaState.Active);
        Assert.That(writesDuringRepair, Is.GreaterThan(5), "guest writes completed while the repair ran");
        Assert.That(cluster.Status(1).RepairDone, Is.EqualTo(Cluster.ExtentCount));

        await cluster.FlushAsync();
        await cluster.WaitForIdleAsync();
        cluster.AssertReplicasIdentical();
        Assert.That(away.Snapshot().Data, Is.EqualTo(model), "replica 1 holds what the guest wrote");
        Assert.That(await cluster.ReadAsync(0, Cluster.ExtentCount * Cluster.ExtentBlocks), Is.EqualTo(model));
    }

    [Test]
    public async Task Writes_racing_the_copy_of_their_extent_are_never_lost_on_the_repaired_replica()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        FakeReplica away = cluster.Replicas[2];
        away.Reachable = false;
        away.DropConnection();
        for (int e = 0; e < Cluster.ExtentCount; e++)
        {
            await cluster.WriteAsync(Block(e), e + 1, blocks: Cluster.ExtentBlocks);
        }
        // The source's extent reads are slow, so guest writes queue behind the copy of each extent.
        cluster.Replicas[0].OpDelay = TimeSpan.FromMilliseconds(5);
        away.Reachable = true;
        await cluster.WaitForStateAsync(2, ReplicaState.Repairing);
        var writes = new List<Task>();
        for (int i = 0; i < 40; i++)
        {
            writes.Add(cluster.WriteAsync(Block(i % Cluster.ExtentCount, i % Cluster.ExtentBlocks), 500 + i));
        }
        await Task.WhenAll(writes).WaitAsync(Cluster.Patience);
        await cluster.WaitForStateAsync(2, ReplicaState.Active);
        cluster.Replicas[0].OpDelay = TimeSpan.Zero;
        await cluster.FlushAsync();
        await cluster.WaitForIdleAsync();
        cluster.AssertReplicasIdentical();
    }

    [Test]
    public async Task A_repair_interrupted_after_a_flush_never_leaves_a_stale_extent_looking_current()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync(Cluster.Options() with { RepairParallelism = 1 }); // extent 3 waits its turn behind extent 1
        FakeReplica away = cluster.Replicas[2];
        FakeReplica source = cluster.Replicas[0];

        away.Reachable = false;
        away.DropConnection();
        await cluster.WriteAsync(Block(1), 1);    // missed by replica 2 (faults it)
        await cluster.WriteAsync(Block(3, 0), 3); // missed by replica 2
        await Cluster.WaitUntilAsync(() => cluster.Status(2).State == ReplicaState.Faulted, "replica 2 is out");

        // Repair starts with extent 1; its copy is held at the source.
        source.Hold(OpKind.ExtentRead);
        away.Reachable = true;
        await Cluster.WaitUntilAsync(() => source.Received.Any(o => o.Kind == OpKind.ExtentRead), "the repair is copying extent 1");

        // While extent 3 waits its turn, the guest writes another block of it and flushes.
        await cluster.WriteAsync(Block(3, 5), 35);
        int flushesAnswered = away.Replied.Count(o => o.Kind == OpKind.Flush);
        Task flush = cluster.FlushAsync();
        await Cluster.WaitUntilAsync(() => !cluster.Replicas[1].Meta(3).Dirty, "replica 1 flushed extent 3");
        await Cluster.WaitUntilAsync(() => away.Replied.Count(o => o.Kind == OpKind.Flush) > flushesAnswered, "the repairing replica answered the flush");
        _ = cluster.Volume.GetStatus(); // asked on the loop: the engine has taken that answer in

        // Replica 2 drops before extent 3 was copied; the flush completes before it is back.
        away.Reachable = false;
        away.DropConnection();
        source.Release();
        await flush.WaitAsync(Cluster.Patience);
        away.Reachable = true;

        await cluster.WaitForAllActiveAsync();
        await cluster.FlushAsync();
        await cluster.WaitForIdleAsync();
        Assert.That(away.ReadBlock(Block(3, 0)), Is.EqualTo(Cluster.Pattern(3, Block(3, 0))), "the block written while replica 2 was away");
        cluster.AssertReplicasIdentical();
    }

    [Test]
    public async Task A_faulted_replica_rejoins_with_a_new_connection_and_the_old_one_is_closed()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        FakeDownstairs first = cluster.Replicas[0].Current!;
        cluster.Replicas[0].FailWritesWith = NbdServer.Protocol.ResultCode.IoError;
        await cluster.WriteAsync(1, 1);
        await Cluster.WaitUntilAsync(() => cluster.Status(0).Faults == 1, "replica 0 faulted");
        cluster.Replicas[0].FailWritesWith = null;
        await cluster.WaitForAllActiveAsync();
        Assert.That(first.IsClosed, Is.True);
        Assert.That(cluster.Replicas[0].Current, Is.Not.SameAs(first));
        Assert.That(cluster.Replicas[0].Current!.Generation, Is.EqualTo(cluster.Volume.Generation), "it rejoins in the same generation");
        await cluster.WriteAsync(2, 2, options: WriteOptions.ForceUnitAccess);
        cluster.AssertReplicasIdentical();
    }

    [Test]
    public async Task A_fault_during_repair_leads_to_one_reconnect_not_a_second_one_that_fences_the_first()
    {
        // Regression: a guest write faulted the repairing replica while its repair copy was in flight;
        // the maintainer reconnected on its own, and the fault's leftover wake-up later made it connect
        // once more, fencing the healthy connection it had just brought back.
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        EngineOptions options = Cluster.Options();
        await cluster.StartAsync(options, clock);
        FakeReplica replica = cluster.Replicas[0];
        replica.Hold(OpKind.ExtentWrite);
        replica.DropConnection();
        await cluster.WriteAsync(1, 1); // finds the connection gone: fault 1, then a repair that copies block 1's extent
        await cluster.WaitForStateAsync(0, ReplicaState.Repairing);
        await Cluster.WaitUntilAsync(() => replica.Received.Any(op => op.Kind == OpKind.ExtentWrite), "the repair copy is in flight");
        replica.FailWritesWith = NbdServer.Protocol.ResultCode.IoError;
        await cluster.WriteAsync(Block(3), 2); // another extent: sent to the repairing replica at once, and refused
        await Cluster.WaitUntilAsync(() => cluster.Status(0).Faults == 2, "the guest write faulted the repairing replica");
        replica.FailWritesWith = null;
        replica.Release();
        await cluster.AdvanceUntilAsync(clock, () => cluster.Volume.GetStatus().Replicas.All(r => r.State == ReplicaState.Active), "all three replicas are active");
        FakeDownstairs serving = replica.Current!;

        await cluster.WriteAsync(Block(4), 3);
        // Past any reconnect backoff, a tick at a time, with a moment after each for a woken maintainer to act.
        for (int i = 0; i < 5 * options.ReconnectMaxDelay / Engine.TickInterval; i++)
        {
            clock.Advance(Engine.TickInterval);
            await Task.Delay(1);
        }
        await cluster.WriteAsync(Block(5), 4, options: WriteOptions.ForceUnitAccess);

        Assert.That(replica.Current, Is.SameAs(serving), "no further connection replaced the one in service");
        Assert.That(serving.IsClosed, Is.False);
        Assert.That(cluster.Status(0).Faults, Is.EqualTo(2));
        cluster.AssertReplicasIdentical();
    }

    [Test]
    public async Task A_repairing_replica_acks_writes_to_extents_it_already_holds_but_not_to_ones_still_to_copy()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        FakeReplica repairing = cluster.Replicas[0], slow = cluster.Replicas[2];
        repairing.Hold(OpKind.ExtentWrite);
        repairing.DropConnection();
        await cluster.WriteAsync(Block(1), 1); // faults replica 0; its repair must copy extent 1 and nothing else
        await cluster.WaitForStateAsync(0, ReplicaState.Repairing);
        await Cluster.WaitUntilAsync(() => repairing.Received.Any(op => op.Kind == OpKind.ExtentWrite), "the copy of extent 1 is in flight");
        slow.Hold(OpKind.Write);

        Task current = cluster.WriteAsync(Block(3), 3);
        Task stillToCopy = cluster.WriteAsync(Block(1, 2), 4);

        Assert.That(await Cluster.CompletesWithinAsync(current, TimeSpan.FromSeconds(2)), Is.True,
            "acked by replica 1 and the repairing replica, which holds extent 3 like one in service");
        FakeReplica inService = cluster.Replicas[1];
        await Cluster.WaitUntilAsync(() => inService.Received.Any(op => op.Kind == OpKind.Write && op.FirstBlock == Block(1, 2)
            && inService.Replied.Contains((OpKind.Write, op.JobId))), "replica 1 answered the write to extent 1");
        await cluster.RepliesAppliedAsync();
        Assert.That(stillToCopy.IsCompleted, Is.False,
            "the repairing replica does not hold extent 1 yet: its write waits for replica 2");
        slow.Release();
        await stillToCopy;
        repairing.Release();
        await cluster.WaitForAllActiveAsync();
        await cluster.FlushAsync();
        cluster.AssertReplicasIdentical();
    }

    [Test]
    public async Task An_upstairs_crash_mid_repair_never_leaves_stale_data_recorded_as_current()
    {
        // The repairing replica takes flushes (its metadata keeps step with the others). A flush must
        // not stamp an extent it still holds stale: after an upstairs crash, reconciliation trusts the
        // stamps, and a stale extent stamped current would never be repaired.
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        // A crawling repair: after copying extent 1 it pauses (100,000 × the copy's time, at most a
        // minute), extent 3 still to do. The clock stands still after the copy, so the pause never ends.
        EngineOptions options = Cluster.Options() with { RepairDutyCycle = 0.00001, IdleRepairDutyCycle = 0.00001, RepairMaxPause = TimeSpan.FromMinutes(1), RepairParallelism = 1 };
        await cluster.StartAsync(options, clock);
        FakeReplica away = cluster.Replicas[2];
        FakeReplica source = cluster.Replicas[0];
        away.Reachable = false;
        away.DropConnection();
        await cluster.WriteAsync(Block(1), 1);    // faults replica 2, which misses it
        await cluster.WriteAsync(Block(3, 0), 3); // missed by replica 2
        await Cluster.WaitUntilAsync(() => cluster.Status(2).State == ReplicaState.Faulted, "replica 2 is out");
        source.Hold(OpKind.ExtentRead);
        away.Reachable = true;
        await cluster.AdvanceUntilAsync(clock, () => source.Received.Any(o => o.Kind == OpKind.ExtentRead), "the copy of extent 1 started");
        clock.Advance(TimeSpan.FromMilliseconds(10)); // the copy takes 10 ms: the pause after it is the full minute
        source.Release();
        await Cluster.WaitUntilAsync(() => cluster.Status(2).RepairDone == 1, "extent 1 copied, extent 3 waiting");

        await cluster.WriteAsync(Block(3, 5), 35);
        await cluster.FlushAsync();
        await Cluster.WaitUntilAsync(() => away.Received.Any(o => o.Kind == OpKind.Flush), "the repairing replica got the flush");
        await cluster.WaitForIdleAsync();
        Assert.That(away.Received.Where(o => o.Kind == OpKind.Write).Select(o => o.FirstBlock), Does.Not.Contain(Block(3, 5)),
            "a write to an extent still to be copied is not sent to the repairing replica (the copy brings it)");
        NbdServer.Protocol.ExtentMeta current = cluster.Replicas[1].Meta(3);
        Assert.That(away.Meta(3), Is.Not.EqualTo(current), "the stale extent was not stamped current by the flush");
        Assert.That(cluster.Status(2).State, Is.EqualTo(ReplicaState.Repairing), "still mid-repair");

        // The upstairs dies mid-repair; a new one reconciles from what the replicas recorded.
        await cluster.Volume.DisposeAsync();
        await cluster.StartAsync(options, clock);
        await cluster.AdvanceUntilAsync(clock, () => cluster.Volume.GetStatus().Replicas.All(r => r.State == ReplicaState.Active), "all three replicas are active");
        await cluster.FlushAsync();
        await cluster.WaitForIdleAsync();
        Assert.That(away.ReadBlock(Block(3, 0)), Is.EqualTo(Cluster.Pattern(3, Block(3, 0))), "the block replica 2 missed");
        cluster.AssertReplicasIdentical();
    }
}

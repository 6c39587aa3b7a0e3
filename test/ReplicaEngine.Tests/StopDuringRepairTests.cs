namespace NbdServer.ReplicaEngine.Tests;

/// <summary>
/// A stop that finds a replica under live repair: the repair gets <see cref="EngineOptions.StopRepairGrace"/>
/// to finish, so the replicas are left identical when it can; past the grace the replica is left
/// behind with one line (its flush numbers say so, and the next activation reconciles it).
/// </summary>
[CancelAfter(45_000)]
public sealed class StopDuringRepairTests
{
    private static long Block(int extent, int offset = 0) => ((long)extent * Cluster.ExtentBlocks) + offset;

    /// <summary>Replica 2 away while four extents are written, then back with its repair's commits held.</summary>
    private static async Task<FakeReplica> RepairingWithCommitsHeldAsync(Cluster cluster)
    {
        FakeReplica away = cluster.Replicas[2];
        away.Reachable = false;
        away.DropConnection();
        await cluster.WriteAsync(Block(0), 1);
        await Cluster.WaitUntilAsync(() => cluster.Status(2).State == ReplicaState.Faulted, "replica 2 is out");
        for (int e = 1; e < 5; e++)
        {
            await cluster.WriteAsync(Block(e, 3), 10 + e);
        }
        await cluster.FlushAsync();
        away.Hold(OpKind.ExtentCommit);
        away.Reachable = true;
        await Cluster.WaitUntilAsync(() => away.Received.Any(op => op.Kind == OpKind.ExtentCommit), "the repair reached its first commit");
        Assert.That(cluster.Status(2).State, Is.EqualTo(ReplicaState.Repairing));
        return away;
    }

    [Test]
    public async Task A_stop_lets_a_live_repair_in_progress_finish_and_the_replicas_are_left_identical()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        FakeReplica away = await RepairingWithCommitsHeldAsync(cluster);

        Task stopping = cluster.Volume.FinishRepairsAsync(CancellationToken.None);
        Assert.That(await Cluster.CompletesWithinAsync(stopping, TimeSpan.FromMilliseconds(300)), Is.False, "the stop waits while the repair runs");
        Assert.That(cluster.Log.Lines.Select(l => l.Message), Has.Some.Contains("live repair has").And.Some.Contains("to finish"));
        away.Release();
        Assert.That(await Cluster.CompletesWithinAsync(stopping, Cluster.Patience), Is.True, "the stop goes on once the repair is done");

        Assert.That(cluster.Status(2).State, Is.EqualTo(ReplicaState.Active));
        Assert.That(cluster.Log.Warnings, Has.None.Contains("left behind"));
        await cluster.WaitForIdleAsync();
        cluster.AssertReplicasIdentical();
    }

    [Test]
    public async Task A_repair_that_outlasts_the_grace_is_left_behind_with_one_line()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync(Cluster.Options() with { StopRepairGrace = TimeSpan.FromMilliseconds(200) });
        FakeReplica away = await RepairingWithCommitsHeldAsync(cluster);

        Task stopping = cluster.Volume.FinishRepairsAsync(CancellationToken.None);
        Assert.That(await Cluster.CompletesWithinAsync(stopping, Cluster.Patience), Is.True, "the stop goes on after the grace");

        Assert.That(cluster.Status(2).State, Is.EqualTo(ReplicaState.Repairing));
        Assert.That(cluster.Log.Warnings.Count(w => w.Contains("under live repair", StringComparison.Ordinal) && w.Contains("left behind", StringComparison.Ordinal)), Is.EqualTo(1));
        away.Release();
    }

    [Test]
    public async Task A_stop_with_every_replica_in_service_does_not_wait()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        await cluster.WriteAsync(Block(1), 1);
        Assert.That(await Cluster.CompletesWithinAsync(cluster.Volume.FinishRepairsAsync(CancellationToken.None), TimeSpan.FromSeconds(2)), Is.True);
        Assert.That(cluster.Log.Lines.Select(l => l.Message), Has.None.Contains("live repair has"));
    }
}

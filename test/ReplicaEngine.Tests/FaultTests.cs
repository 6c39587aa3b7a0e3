using Microsoft.Extensions.Time.Testing;
using NbdServer.Common.Volumes;
using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine.Tests;

[CancelAfter(30_000)]
public sealed class FaultTests
{
    private static readonly TimeSpan Tick = Engine.TickInterval;

    /// <summary>The guest goes on with two: writes are acked, reads return what was written.</summary>
    private static async Task AssertGuestContinuesOnTwoAsync(Cluster cluster, int seed)
    {
        for (int i = 0; i < 10; i++)
        {
            await cluster.WriteAsync(40 + i, seed + i);
        }
        await cluster.FlushAsync();
        for (int i = 0; i < 10; i++)
        {
            Assert.That(await cluster.ReadAsync(40 + i), Is.EqualTo(Cluster.Pattern(seed + i, 40 + i)));
        }
    }

    [Test]
    public async Task A_write_error_faults_that_replica_at_once_and_the_guest_write_still_succeeds()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        FakeReplica bad = cluster.Replicas[0];
        bad.Reachable = false; // stays out once faulted, so the state can be observed
        bad.FailWritesWith = ResultCode.NoSpace;

        await cluster.WriteAsync(1, 1);
        await cluster.WaitForStateAsync(0, ReplicaState.Faulted);

        ReplicaStatus status = cluster.Status(0);
        Assert.That(status.LastFault, Does.Contain("no space"));
        Assert.That(status.Faults, Is.EqualTo(1));
        Assert.That(status.OutstandingJobs, Is.Zero);
        Assert.That(cluster.Volume.GetStatus().InService, Is.EqualTo(2));
        Assert.That(cluster.Log.Warnings.Any(w => w.Contains("Replica 0") && w.Contains("FAULTED") && w.Contains("no space")), Is.True, "one warning says why");
        Assert.That(bad.Current!.IsClosed, Is.True, "the faulted replica's connection is closed");
        await AssertGuestContinuesOnTwoAsync(cluster, 10);
    }

    [Test]
    public async Task A_flush_error_faults_that_replica_and_the_flush_still_succeeds()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        cluster.Replicas[1].Reachable = false;
        cluster.Replicas[1].FailFlushesWith = ResultCode.IoError;

        await cluster.WriteAsync(1, 1);
        await cluster.FlushAsync();
        await cluster.WaitForStateAsync(1, ReplicaState.Faulted);
        Assert.That(cluster.Status(1).LastFault, Does.Contain("flush failed").And.Contain("IO error"));
        await AssertGuestContinuesOnTwoAsync(cluster, 20);
    }

    [Test]
    public async Task A_replica_over_its_job_budget_is_faulted_and_its_outstanding_work_is_freed()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync(Cluster.Options() with { MaxOutstandingJobs = 8 });
        FakeReplica held = cluster.Replicas[2];
        held.Reachable = false;
        held.Hold();
        FakeDownstairs connection = held.Current!;

        for (int i = 0; i < 8; i++)
        {
            await cluster.WriteAsync(i, i);
        }
        Assert.That(cluster.Status(2).OutstandingJobs, Is.EqualTo(8), "eight jobs wait at the held replica");
        Assert.That(cluster.Status(2).State, Is.EqualTo(ReplicaState.Active), "at the budget, not over it");

        await cluster.WriteAsync(8, 8);
        ReplicaStatus status = cluster.Status(2);
        Assert.That(status.State, Is.EqualTo(ReplicaState.Faulted));
        Assert.That(status.LastFault, Does.Contain("over budget"));
        Assert.That((status.OutstandingJobs, status.OutstandingBytes), Is.EqualTo((0, 0L)), "its jobs were dropped");
        await Cluster.WaitUntilAsync(() => connection.IsClosed, "the held connection is closed (its pending requests freed)");
        await AssertGuestContinuesOnTwoAsync(cluster, 30);
    }

    [Test]
    public async Task A_replica_that_makes_no_progress_for_the_timeout_is_faulted()
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        EngineOptions options = Cluster.Options() with { NoProgressTimeout = TimeSpan.FromMilliseconds(300) };
        await cluster.StartAsync(options, clock);
        cluster.Replicas[1].Reachable = false;
        cluster.Replicas[1].Hold();

        await cluster.WriteAsync(2, 2);
        Cluster.Advance(clock, options.NoProgressTimeout - Tick);
        Assert.That(cluster.Status(1).State, Is.EqualTo(ReplicaState.Active), "not before the timeout");
        Cluster.Advance(clock, Tick * 2);
        Assert.That(cluster.Status(1).State, Is.EqualTo(ReplicaState.Faulted));
        Assert.That(cluster.Status(1).LastFault, Does.Contain("no progress"));
        Assert.That(cluster.Status(1).OutstandingJobs, Is.Zero);
        await AssertGuestContinuesOnTwoAsync(cluster, 40);
    }

    [Test]
    public async Task An_idle_replica_is_never_faulted_for_lack_of_progress()
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        EngineOptions options = Cluster.Options() with { NoProgressTimeout = TimeSpan.FromMilliseconds(200) };
        await cluster.StartAsync(options, clock);
        await cluster.WriteAsync(2, 2);
        await cluster.WaitForIdleAsync();
        Cluster.Advance(clock, options.NoProgressTimeout * 10);
        Assert.That(cluster.Volume.GetStatus().Replicas.Select(r => r.Faults), Is.All.Zero);
        await cluster.WriteAsync(3, 3);
        Assert.That(cluster.Volume.GetStatus().Replicas.Select(r => r.State), Is.All.EqualTo(ReplicaState.Active));
    }

    [Test]
    public async Task A_dropped_connection_faults_the_replica_and_the_guest_continues()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        cluster.Replicas[2].Reachable = false;
        cluster.Replicas[2].Hold();
        Task pending = cluster.WriteAsync(4, 4);
        await pending.WaitAsync(Cluster.Patience);
        cluster.Replicas[2].DropConnection();

        await cluster.WaitForStateAsync(2, ReplicaState.Faulted);
        ReplicaStatus status = cluster.Status(2);
        Assert.That(status.LastFault, Does.Contain("connection lost"));
        Assert.That(status.Faults, Is.EqualTo(1));
        await AssertGuestContinuesOnTwoAsync(cluster, 50);
    }

    [Test]
    public async Task A_faulted_replica_reconnects_is_repaired_and_counts_its_faults()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        cluster.Replicas[0].FailWritesWith = ResultCode.IoError;
        await cluster.WriteAsync(1, 1);
        await Cluster.WaitUntilAsync(() => cluster.Status(0).Faults == 1, "the write error faulted replica 0");
        cluster.Replicas[0].FailWritesWith = null;
        await cluster.WaitForAllActiveAsync();
        Assert.That(cluster.Replicas[0].ReadBlock(1), Is.EqualTo(Cluster.Pattern(1, 1)), "the missed write was repaired in");

        cluster.Replicas[0].FailWritesWith = ResultCode.IoError;
        await cluster.WriteAsync(2, 2);
        await Cluster.WaitUntilAsync(() => cluster.Status(0).Faults == 2, "second fault counted");
        cluster.Replicas[0].FailWritesWith = null;
        await cluster.WaitForAllActiveAsync();
        await cluster.FlushAsync();
        cluster.AssertReplicasIdentical();
    }

    [Test]
    public async Task With_one_replica_in_service_writes_fail_with_EIO_within_the_bounded_wait_and_reads_go_on()
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        TimeSpan bound = TimeSpan.FromMilliseconds(500);
        await cluster.StartAsync(Cluster.Options() with { DegradedWriteTimeout = bound }, clock);
        await cluster.WriteAsync(6, 6);
        foreach (int r in new[] { 1, 2 })
        {
            cluster.Replicas[r].Reachable = false;
            cluster.Replicas[r].DropConnection();
        }

        // The first write finds both connections gone: it can never reach two replicas.
        Assert.That(async () => await cluster.WriteAsync(7, 7), Throws.TypeOf<VolumeException>().With.Property(nameof(VolumeException.Error)).EqualTo(VolumeError.IoError));
        await Cluster.WaitUntilAsync(() => cluster.Volume.GetStatus().InService == 1, "one replica in service");

        Task write = cluster.WriteAsync(8, 8);
        Cluster.Advance(clock, bound - Tick);
        await cluster.RepliesAppliedAsync();
        Assert.That(write.IsCompleted, Is.False, "before the bound the write waits for a second replica");
        Cluster.Advance(clock, Tick * 2);
        Assert.That(async () => await write.WaitAsync(Cluster.Patience), Throws.TypeOf<VolumeException>().With.Property(nameof(VolumeException.Error)).EqualTo(VolumeError.IoError));
        Task flush = cluster.FlushAsync();
        Cluster.Advance(clock, bound + Tick);
        Assert.That(async () => await flush.WaitAsync(Cluster.Patience), Throws.TypeOf<VolumeException>());

        Assert.That(await cluster.ReadAsync(6), Is.EqualTo(Cluster.Pattern(6, 6)), "reads go on from the one left");

        // A second replica returns (live repair from the one left): writes work again.
        cluster.Replicas[1].Reachable = true;
        await cluster.AdvanceUntilAsync(clock, () => cluster.Status(1).State == ReplicaState.Active, "replica 1 is back in service");
        await cluster.WriteAsync(9, 9);
        Assert.That(await cluster.ReadAsync(9), Is.EqualTo(Cluster.Pattern(9, 9)));
    }

    [Test]
    public async Task A_write_waiting_in_degraded_mode_succeeds_if_a_second_replica_returns_in_time()
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        TimeSpan bound = TimeSpan.FromSeconds(5);
        await cluster.StartAsync(Cluster.Options() with { DegradedWriteTimeout = bound }, clock);
        foreach (int r in new[] { 1, 2 })
        {
            cluster.Replicas[r].Reachable = false;
            cluster.Replicas[r].DropConnection();
        }
        Assert.That(async () => await cluster.WriteAsync(7, 7), Throws.TypeOf<VolumeException>());
        await Cluster.WaitUntilAsync(() => cluster.Volume.GetStatus().InService == 1, "one replica in service");

        Task waiting = cluster.WriteAsync(8, 8);
        DateTimeOffset deadline = clock.GetUtcNow() + bound;
        Cluster.Advance(clock, bound - TimeSpan.FromSeconds(1));
        await cluster.RepliesAppliedAsync();
        Assert.That(waiting.IsCompleted, Is.False, "waits for a second replica");
        cluster.Replicas[2].Reachable = true;
        await cluster.AdvanceUntilAsync(clock, () => waiting.IsCompleted, "the waiting write completed", TimeSpan.FromMilliseconds(10));
        Assert.That(clock.GetUtcNow(), Is.LessThan(deadline), "the second replica returned within the bound");
        await waiting;
        Assert.That(await cluster.ReadAsync(8), Is.EqualTo(Cluster.Pattern(8, 8)));
    }
}

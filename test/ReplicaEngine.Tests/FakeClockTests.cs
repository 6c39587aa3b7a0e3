using Microsoft.Extensions.Time.Testing;
using NbdServer.Common.Volumes;

namespace NbdServer.ReplicaEngine.Tests;

/// <summary>
/// Deadlines on the engine's own clock: time only moves when the test moves it, so "nothing happens
/// before the deadline" is asserted by advancing to just before it, never by waiting.
/// </summary>
[CancelAfter(30_000)]
public sealed class FakeClockTests
{
    private static readonly TimeSpan Tick = Engine.TickInterval;

    [Test]
    public async Task A_read_on_a_stalled_replica_goes_to_another_only_once_the_read_deadline_has_passed()
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        await cluster.StartAsync(Cluster.Options(), clock);
        await cluster.WriteAsync(3, 7);
        await cluster.WaitForIdleAsync();
        cluster.Replicas[0].Hold(OpKind.Read); // the least-loaded replica, so the first read goes to it

        byte[] data = new byte[Cluster.BlockSize];
        Task read = cluster.Volume.ReadAsync(3 * Cluster.BlockSize, data, CancellationToken.None).AsTask();
        await Cluster.WaitUntilAsync(() => cluster.Replicas[0].Received.Any(op => op.Kind == OpKind.Read), "replica 0 received the read");
        clock.Advance(Cluster.Options().ReadAttemptTimeout - Tick);
        Assert.That(read.IsCompleted, Is.False, "before the deadline the read still waits for replica 0");

        clock.Advance(Tick * 2);
        await read.WaitAsync(Cluster.Patience);
        Assert.That(data, Is.EqualTo(Cluster.Pattern(7, 3)));
        Assert.That(cluster.Replicas[1].Received.Count(op => op.Kind == OpKind.Read), Is.EqualTo(1), "served by the next replica");
        Assert.That(cluster.Status(0).State, Is.EqualTo(ReplicaState.Active), "a slow read alone does not fault");
    }

    [Test]
    public async Task A_replica_that_completes_nothing_is_faulted_exactly_when_the_no_progress_timeout_passes()
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        EngineOptions options = Cluster.Options();
        await cluster.StartAsync(options, clock);
        cluster.Replicas[2].Reachable = false;
        cluster.Replicas[2].Hold(OpKind.Write);

        await cluster.WriteAsync(1, 1); // acked by replicas 0 and 1
        clock.Advance(options.NoProgressTimeout - Tick);
        Assert.That(cluster.Status(2).State, Is.EqualTo(ReplicaState.Active), "just before the timeout it is still in service");

        clock.Advance(Tick * 2);
        Assert.That(cluster.Status(2).State, Is.EqualTo(ReplicaState.Faulted));
        Assert.That(cluster.Status(2).LastFault, Does.Contain("no progress"));
    }

    [Test]
    public async Task With_one_replica_in_service_a_write_fails_with_EIO_only_once_the_degraded_timeout_passes()
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        EngineOptions options = Cluster.Options();
        await cluster.StartAsync(options, clock);
        foreach (int r in new[] { 1, 2 })
        {
            cluster.Replicas[r].Reachable = false;
            cluster.Replicas[r].DropConnection();
        }
        // The next write finds both connections gone: their failed jobs fault them (and the write fails).
        await cluster.WriteAsync(0, 1).ContinueWith(_ => { });
        await Cluster.WaitUntilAsync(() => cluster.Volume.GetStatus().InService == 1, "only replica 0 is in service");

        Task write = cluster.Volume.WriteAsync(5 * Cluster.BlockSize, Cluster.Pattern(2, 5), WriteOptions.None, CancellationToken.None).AsTask();
        clock.Advance(options.DegradedWriteTimeout - Tick);
        Assert.That(write.IsCompleted, Is.False, "before the timeout the write waits for a second replica");

        clock.Advance(Tick * 2);
        VolumeException? failed = Assert.ThrowsAsync<VolumeException>(async () => await write.WaitAsync(Cluster.Patience));
        Assert.That(failed!.Error, Is.EqualTo(VolumeError.IoError));
        Assert.That(failed.Message, Does.Contain("replica(s) in service"));
    }
}

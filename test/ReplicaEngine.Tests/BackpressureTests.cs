using Microsoft.Extensions.Time.Testing;

namespace NbdServer.ReplicaEngine.Tests;

[CancelAfter(30_000)]
public sealed class BackpressureTests
{
    [Test]
    public async Task One_held_active_replica_delays_admission_by_no_more_than_its_own_small_cap()
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        // Two loaded replicas could delay a write by 2 s; one Active replica alone by 2 ms. Under
        // the larger cap the writes at 70 % and 80 % of its budget would wait 125 ms and 500 ms.
        await cluster.StartAsync(Cluster.Options() with { MaxOutstandingJobs = 10, MaxAdmissionDelay = TimeSpan.FromSeconds(2), SlowReplicaMaxAdmissionDelay = TimeSpan.FromMilliseconds(2) }, clock);
        cluster.Replicas[2].Hold();

        // The clock moves only while a write waits for admission, so what it moved by is the delay the guest paid.
        TimeSpan step = TimeSpan.FromMilliseconds(5);
        TimeSpan delayed = TimeSpan.Zero;
        for (int i = 0; i < 8; i++)
        {
            long block = i;
            bool Sent() => cluster.Replicas[0].Received.Any(op => op.Kind == OpKind.Write && op.FirstBlock == block);
            Task write = cluster.WriteAsync(block, i);
            await cluster.RepliesAppliedAsync();
            while (!Sent() && delayed < Cluster.Patience)
            {
                clock.Advance(step);
                delayed += step;
                await cluster.RepliesAppliedAsync();
            }
            await write;
        }
        // Each delayed write costs at least one 5 ms step of the clock, however short its delay.
        Assert.That(delayed, Is.LessThanOrEqualTo(TimeSpan.FromMilliseconds(20)), "admission delay over eight writes on the engine's clock");
        Assert.That(cluster.Status(2).OutstandingJobs, Is.EqualTo(8));
        Assert.That(cluster.Status(2).State, Is.EqualTo(ReplicaState.Active));
    }

    [Test]
    public async Task Two_lagging_replicas_delay_admission_but_writes_never_stop()
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        EngineOptions options = Cluster.Options() with { MaxOutstandingJobs = 10, MaxAdmissionDelay = TimeSpan.FromMilliseconds(50) };
        await cluster.StartAsync(options, clock);
        cluster.Replicas[1].Hold();
        cluster.Replicas[2].Hold();
        FakeReplica free = cluster.Replicas[0];
        int WritesAnswered() => free.Replied.Count(r => r.Kind == OpKind.Write);

        // With two replicas held no write can be acked; admission slows as they fill, but nothing is dropped.
        Task[] writes = [.. Enumerable.Range(0, 9).Select(i => cluster.WriteAsync(i * 3, 70 + i))];
        await cluster.RepliesAppliedAsync();
        Assert.That(free.Received.Count(r => r.Kind == OpKind.Write), Is.LessThan(9), "admission holds writes back while the clock stands still");
        // A delay never exceeds MaxAdmissionDelay, so each step admits at least the next parked write.
        for (int step = 0; step < 9 && free.Received.Count(r => r.Kind == OpKind.Write) < 9; step++)
        {
            clock.Advance(options.MaxAdmissionDelay);
            await cluster.RepliesAppliedAsync();
        }
        Assert.That(free.Received.Count(r => r.Kind == OpKind.Write), Is.EqualTo(9), "every write was admitted, none dropped");
        await Cluster.WaitUntilAsync(() => WritesAnswered() == 9, "replica 0 answered every write");
        await cluster.RepliesAppliedAsync();
        Assert.That(writes.Count(w => w.IsCompleted), Is.Zero, "no write acked by one replica");
        Assert.That(cluster.Volume.GetStatus().Replicas.Select(r => r.State), Is.All.EqualTo(ReplicaState.Active));

        cluster.Replicas[1].Release();
        cluster.Replicas[2].Release();
        await Task.WhenAll(writes).WaitAsync(Cluster.Patience);
        for (int i = 0; i < 9; i++)
        {
            Assert.That(await cluster.ReadAsync(i * 3), Is.EqualTo(Cluster.Pattern(70 + i, i * 3)));
        }
    }

    [Test]
    public async Task Two_slow_replicas_throttle_a_heavy_writer_that_still_completes_every_write()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync(Cluster.Options() with { MaxOutstandingJobs = 16, MaxAdmissionDelay = TimeSpan.FromMilliseconds(10) });
        cluster.Replicas[1].OpDelay = TimeSpan.FromMilliseconds(3);
        cluster.Replicas[2].OpDelay = TimeSpan.FromMilliseconds(3);

        int completed = 0;
        Task[] writers = [.. Enumerable.Range(0, 12).Select(w => Task.Run(async () =>
        {
            for (int i = 0; i < 15; i++)
            {
                await cluster.WriteAsync(((w * 10) + i) % 128, w + i);
                Interlocked.Increment(ref completed);
            }
        }))];
        await Task.WhenAll(writers).WaitAsync(TimeSpan.FromSeconds(20));
        Assert.That(completed, Is.EqualTo(12 * 15));
        Assert.That(cluster.Volume.GetStatus().InService, Is.GreaterThanOrEqualTo(2));

        cluster.Replicas[1].OpDelay = TimeSpan.Zero;
        cluster.Replicas[2].OpDelay = TimeSpan.Zero;
        await cluster.WaitForAllActiveAsync();
        await cluster.FlushAsync();
        await cluster.WaitForIdleAsync();
        cluster.AssertReplicasIdentical(includeMeta: false);
    }
}

using NbdServer.Common.Volumes;

namespace NbdServer.ReplicaEngine.Tests;

[CancelAfter(30_000)]
public sealed class OrderingAndAckTests
{
    [Test]
    public async Task Jobs_reach_every_replica_in_job_id_order()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        foreach (FakeReplica r in cluster.Replicas)
        {
            r.ClearReceived();
        }

        // Many writers at once, with flushes among them: submission order must still be id order everywhere.
        Task[] writers = [.. Enumerable.Range(0, 8).Select(w => Task.Run(async () =>
        {
            for (int i = 0; i < 20; i++)
            {
                await cluster.WriteAsync(((w * 16) + i) % 128, (w * 100) + i);
                if (i % 7 == 0)
                {
                    await cluster.FlushAsync();
                }
            }
        }))];
        await Task.WhenAll(writers);

        foreach (FakeReplica r in cluster.Replicas)
        {
            ulong[] ids = [.. r.Received.Select(o => o.JobId)];
            Assert.That(ids, Has.Length.GreaterThanOrEqualTo(160), $"replica {r.Index} got every write");
            Assert.That(ids, Is.Ordered.And.Unique, $"job ids as replica {r.Index} received them");
        }
        var writesPerReplica = cluster.Replicas.Select(r => r.Received.Where(o => o.Kind == OpKind.Write).Select(o => o.JobId).ToArray()).ToArray();
        Assert.That(writesPerReplica[1], Is.EqualTo(writesPerReplica[0]));
        Assert.That(writesPerReplica[2], Is.EqualTo(writesPerReplica[0]));
    }

    [Test]
    public async Task Overlapping_writes_apply_in_submission_order_on_every_replica()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        // Replica 1 is slow so its answers come late; order must not depend on timing.
        cluster.Replicas[1].OpDelay = TimeSpan.FromMilliseconds(2);
        var writes = new List<Task>();
        for (int seed = 1; seed <= 30; seed++)
        {
            // Alternate whole-extent and single-block writes over the same blocks.
            writes.Add(seed % 2 == 0
                ? cluster.Volume.WriteAsync(8 * Cluster.BlockSize, Cluster.Pattern(seed, 8, 8), WriteOptions.None, CancellationToken.None).AsTask()
                : cluster.Volume.WriteAsync(10 * Cluster.BlockSize, Cluster.Pattern(seed, 10), WriteOptions.None, CancellationToken.None).AsTask());
        }
        await Task.WhenAll(writes).WaitAsync(Cluster.Patience);
        cluster.Replicas[1].OpDelay = TimeSpan.Zero;
        await cluster.FlushAsync();
        await Cluster.WaitUntilAsync(() => cluster.Volume.GetStatus().Replicas.All(r => r.OutstandingJobs == 0), "the slow replica caught up");

        // Last whole-extent write was seed 30, then no later single-block write (29 came before 30).
        Assert.That(await cluster.ReadAsync(8, 8), Is.EqualTo(Cluster.Pattern(30, 8, 8)));
        foreach (FakeReplica r in cluster.Replicas)
        {
            ulong[] ids = [.. r.Received.Where(o => o.Kind == OpKind.Write).Select(o => o.JobId)];
            Assert.That(ids, Is.Ordered, $"overlapping writes as replica {r.Index} received them");
            Assert.That(r.ReadBlock(10), Is.EqualTo(Cluster.Pattern(30, 8, 8).AsSpan(2 * Cluster.BlockSize, Cluster.BlockSize).ToArray()));
        }
        cluster.AssertReplicasIdentical();
    }

    [Test]
    public async Task A_write_is_acknowledged_once_two_replicas_applied_it_while_the_third_is_held()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        cluster.Replicas[2].Hold();

        Task write = cluster.WriteAsync(3, 1);
        Assert.That(await Cluster.CompletesWithinAsync(write, Cluster.Patience), Is.True, "write acked by replicas 0 and 1");
        await write;
        Assert.That(cluster.Replicas[0].ReadBlock(3), Is.EqualTo(Cluster.Pattern(1, 3)));
        Assert.That(cluster.Replicas[1].ReadBlock(3), Is.EqualTo(Cluster.Pattern(1, 3)));
        Assert.That(cluster.Replicas[2].ReadBlock(3), Is.Not.EqualTo(Cluster.Pattern(1, 3)), "replica 2 still holds it");

        cluster.Replicas[2].Release();
        await Cluster.WaitUntilAsync(() => cluster.Replicas[2].ReadBlock(3).SequenceEqual(Cluster.Pattern(1, 3)), "replica 2 applied the write");
        Assert.That(cluster.Status(2).State, Is.EqualTo(ReplicaState.Active));
    }

    [Test]
    public async Task A_write_applied_by_only_one_replica_is_not_acknowledged()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        cluster.Replicas[1].Hold();
        cluster.Replicas[2].Hold();

        Task write = cluster.WriteAsync(5, 2);
        await Cluster.WaitUntilAsync(() => cluster.Replicas[0].Replied.Any(r => r.Kind == OpKind.Write), "replica 0 answered the write");
        await cluster.RepliesAppliedAsync();
        Assert.That(write.IsCompleted, Is.False, "acked with one replica");
        Assert.That(cluster.Replicas[0].ReadBlock(5), Is.EqualTo(Cluster.Pattern(2, 5)), "replica 0 applied it");

        cluster.Replicas[1].Release();
        Assert.That(await Cluster.CompletesWithinAsync(write, Cluster.Patience), Is.True, "acked once a second replica applied it");
        await write;
    }

    [Test]
    public async Task A_flush_is_acknowledged_once_two_replicas_made_it_durable()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        await cluster.WriteAsync(0, 1);

        cluster.Replicas[2].Hold(OpKind.Flush);
        Task first = cluster.FlushAsync();
        Assert.That(await Cluster.CompletesWithinAsync(first, Cluster.Patience), Is.True, "flush acked by replicas 0 and 1");
        await first;
        Assert.That(cluster.Replicas[0].Meta(0).Dirty, Is.False);
        Assert.That(cluster.Replicas[2].Meta(0).Dirty, Is.True, "replica 2 has not flushed yet");

        await cluster.WriteAsync(9, 2);
        cluster.Replicas[1].Hold(OpKind.Flush);
        int flushesAnswered = cluster.Replicas[0].Replied.Count(r => r.Kind == OpKind.Flush);
        Task second = cluster.FlushAsync();
        await Cluster.WaitUntilAsync(() => cluster.Replicas[0].Replied.Count(r => r.Kind == OpKind.Flush) > flushesAnswered, "replica 0 answered the second flush");
        await cluster.RepliesAppliedAsync();
        Assert.That(second.IsCompleted, Is.False, "flush acked with one durable copy");
        cluster.Replicas[1].Release();
        Assert.That(await Cluster.CompletesWithinAsync(second, Cluster.Patience), Is.True);
        await second;
        cluster.Replicas[2].Release();
    }

    [Test]
    public async Task A_FUA_write_is_followed_by_a_flush_and_acknowledged_only_when_two_made_it_durable()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        foreach (FakeReplica r in cluster.Replicas)
        {
            r.ClearReceived();
        }
        cluster.Replicas[1].Hold(OpKind.Flush);
        cluster.Replicas[2].Hold(OpKind.Flush);

        Task fua = cluster.WriteAsync(17, 4, options: WriteOptions.ForceUnitAccess);
        await Cluster.WaitUntilAsync(() => cluster.Replicas.All(r => r.Replied.Any(o => o.Kind == OpKind.Write)) && cluster.Replicas[0].Replied.Any(o => o.Kind == OpKind.Flush),
            "every replica answered the write and replica 0 the flush");
        await cluster.RepliesAppliedAsync();
        Assert.That(fua.IsCompleted, Is.False, "FUA write acked before two durable copies");
        Assert.That(cluster.Replicas[1].ReadBlock(17), Is.EqualTo(Cluster.Pattern(4, 17)), "the write itself was applied");

        cluster.Replicas[1].Release();
        Assert.That(await Cluster.CompletesWithinAsync(fua, Cluster.Patience), Is.True);
        await fua;
        foreach (FakeReplica r in cluster.Replicas)
        {
            Assert.That(r.Received.Select(o => o.Kind).Where(k => k != OpKind.Read), Is.EqualTo(new[] { OpKind.Write, OpKind.Flush }), $"replica {r.Index} (the test's own read aside)");
        }
        Assert.That(cluster.Replicas[0].Meta(2), Is.EqualTo(cluster.Replicas[1].Meta(2)).And.Property(nameof(NbdServer.Protocol.ExtentMeta.Dirty)).False);
        cluster.Replicas[2].Release();
    }
}

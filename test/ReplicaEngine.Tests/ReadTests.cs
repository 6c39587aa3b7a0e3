namespace NbdServer.ReplicaEngine.Tests;

[CancelAfter(30_000)]
public sealed class ReadTests
{
    [Test]
    public async Task A_read_is_served_by_one_replica()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        await cluster.WriteAsync(20, 5, blocks: 4);
        foreach (FakeReplica r in cluster.Replicas)
        {
            r.ClearReceived();
        }

        Assert.That(await cluster.ReadAsync(20, 4), Is.EqualTo(Cluster.Pattern(5, 20, 4)));
        Assert.That(cluster.Replicas.Sum(r => r.Received.Count(o => o.Kind == OpKind.Read)), Is.EqualTo(1));
    }

    [Test]
    public async Task A_partial_block_write_keeps_the_rest_of_the_block()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        await cluster.WriteAsync(30, 3, blocks: 2);
        byte[] patch = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        await cluster.Volume.WriteAsync((30 * Cluster.BlockSize) + 500, patch, Common.Volumes.WriteOptions.None, CancellationToken.None);

        byte[] expected = Cluster.Pattern(3, 30, 2);
        patch.CopyTo(expected, 500);
        Assert.That(await cluster.ReadAsync(30, 2), Is.EqualTo(expected));
        foreach (FakeReplica r in cluster.Replicas)
        {
            Assert.That(r.ReadBlock(31), Is.EqualTo(expected[Cluster.BlockSize..]), $"replica {r.Index}");
        }
    }

    [Test]
    public async Task A_corrupted_block_is_answered_correctly_from_another_replica_and_repaired()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        await cluster.WriteAsync(12, 7, blocks: 3);
        await cluster.FlushAsync();
        // Corrupt the copy on every replica the read might pick first.
        cluster.Replicas[0].CorruptBlock(13);
        await cluster.WaitForIdleAsync(); // so the first read goes to replica 0

        for (int i = 0; i < 3; i++)
        {
            Assert.That(await cluster.ReadAsync(12, 3), Is.EqualTo(Cluster.Pattern(7, 12, 3)), "the guest gets correct data");
        }
        byte[] good = Cluster.Pattern(7, 13);
        await Cluster.WaitUntilAsync(() => cluster.Replicas[0].ReadBlock(13).SequenceEqual(good), "the bad copy was repaired");
        Assert.That(cluster.Replicas[1].ReadBlock(13), Is.EqualTo(good));
        Assert.That(cluster.Status(0).Errors, Is.GreaterThanOrEqualTo(1), "the bad block counts as an error");
        Assert.That(cluster.Volume.GetStatus().Replicas.Select(r => r.State), Is.All.EqualTo(ReplicaState.Active), "a bad block is repaired, not a fault");
        Assert.That(cluster.Log.Warnings.Any(w => w.Contains("repaired")), Is.True);
        await cluster.FlushAsync();
        cluster.AssertReplicasIdentical(includeMeta: false);
    }

    [Test]
    public async Task A_block_corrupted_on_two_replicas_is_served_by_the_third_and_both_copies_are_repaired()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        await cluster.WriteAsync(50, 9);
        cluster.Replicas[0].CorruptBlock(50);
        cluster.Replicas[1].CorruptBlock(50);

        Assert.That(await cluster.ReadAsync(50), Is.EqualTo(Cluster.Pattern(9, 50)));
        byte[] good = Cluster.Pattern(9, 50);
        await Cluster.WaitUntilAsync(
            () => cluster.Replicas.All(r => r.ReadBlock(50).SequenceEqual(good)),
            "both bad copies were repaired");
        cluster.AssertReplicasIdentical(includeMeta: false);
    }

    [Test]
    public async Task A_read_that_fails_on_one_replica_is_retried_on_another()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        await cluster.WriteAsync(60, 11);
        await cluster.WaitForIdleAsync(); // so the read goes to replica 0 (least loaded, first)
        cluster.Replicas[0].Reachable = false;
        cluster.Replicas[0].DropConnection();

        Assert.That(await cluster.ReadAsync(60), Is.EqualTo(Cluster.Pattern(11, 60)));
        Assert.That(cluster.Status(0).State, Is.EqualTo(ReplicaState.Faulted));
    }
}

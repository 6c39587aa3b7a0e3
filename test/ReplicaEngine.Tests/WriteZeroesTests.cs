using NbdServer.Common.Volumes;

namespace NbdServer.ReplicaEngine.Tests;

[CancelAfter(30_000)]
public sealed class WriteZeroesTests
{
    [Test]
    public async Task Many_small_write_zeroes_at_once_allocate_no_buffer_per_request_and_zero_their_blocks()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        const int Requests = 32;
        await cluster.WriteAsync(0, 9, blocks: Requests);

        // A client may pipeline many small WRITE_ZEROES; each used to rent (and clear) its own 4 MiB
        // buffer, 128 MiB for these 32 requests of one block each.
        long before = GC.GetTotalAllocatedBytes(precise: true);
        await Task.WhenAll(Enumerable.Range(0, Requests).Select(i =>
            cluster.Volume.WriteZeroesAsync((long)i * Cluster.BlockSize, Cluster.BlockSize, WriteOptions.None, CancellationToken.None).AsTask()));
        long allocated = GC.GetTotalAllocatedBytes(precise: true) - before;

        Assert.That(allocated, Is.LessThan(16L << 20), "bytes allocated by 32 one-block WRITE_ZEROES");
        Assert.That(await cluster.ReadAsync(0, Requests), Is.All.EqualTo(0));
        foreach (FakeReplica replica in cluster.Replicas)
        {
            Assert.That(replica.ReadBlock(Requests - 1), Is.All.EqualTo(0), $"replica {replica.Index}");
        }
    }
}

using Microsoft.Extensions.Time.Testing;
using NbdServer.Common.Volumes;
using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine.Tests;

/// <summary>The engine's hot path allocates nothing per IO once warm: jobs, completions and async state are pooled.</summary>
[CancelAfter(60_000)]
public sealed class AllocationTests
{
    private const int Warmup = 2_000;
    private const int Measured = 20_000;

    /// <summary>Under one byte per IO: any per-IO object (a job, a task, a closure) costs at least 24.</summary>
    private const double AllowedBytesPerIo = 1;

    [Test]
    public async Task Steady_state_4k_writes_and_reads_allocate_nothing_per_IO()
    {
        var connector = new InlineDownstairs(blockSize: 4096, blocks: 64);
        // A clock that never moves: no tick can run the loop on a timer thread mid-measurement.
        await using ReplicatedVolume volume = await ReplicatedVolume.StartAsync(Cluster.Options(), new ListLogger(), connector, CancellationToken.None, time: new FakeTimeProvider());
        byte[] block = new byte[4096];
        Random.Shared.NextBytes(block);
        // The replicas answer inside the call, so every step of an IO runs on the test's thread and the
        // thread's own allocation counter sees all of it (and nothing of the test runner's threads).

        for (int i = 0; i < Warmup; i++)
        {
            await volume.WriteAsync((i % 64) * 4096L, block, WriteOptions.None, CancellationToken.None);
            await volume.ReadAsync((i % 64) * 4096L, block, CancellationToken.None);
        }
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < Measured; i++)
        {
            await volume.WriteAsync((i % 64) * 4096L, block, WriteOptions.None, CancellationToken.None);
            await volume.ReadAsync((i % 64) * 4096L, block, CancellationToken.None);
        }
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        double perIo = allocated / (2.0 * Measured);
        TestContext.Out.WriteLine($"{allocated:N0} bytes over {2 * Measured:N0} IOs: {perIo:0.00} bytes per IO");
        Assert.That(perIo, Is.LessThan(AllowedBytesPerIo));
    }
}

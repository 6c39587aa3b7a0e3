using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Running;
using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Extensions.Time.Testing;
using NbdServer.Common.Volumes;

namespace NbdServer.ReplicaEngine.Bench;

/// <summary>
/// One 4 KiB guest write (copy, hash, job, three replies, ack) and one 4 KiB read (job, reply, hash
/// check, copy) through the engine loop, against replicas that answer inside the call. The
/// allocation column is the figure to watch: it must read "-" (nothing per operation).
/// </summary>
[MemoryDiagnoser]
public class EnginePath
{
    private const int BlockSize = 4096;
    private const int Blocks = 1024;
    private readonly byte[] _block = new byte[BlockSize];
    private ReplicatedVolume _volume = null!;
    private long _next;

    [GlobalSetup]
    public void Setup()
    {
        Random.Shared.NextBytes(_block);
        var options = new EngineOptions
        {
            Downstairs = [new(System.Net.IPAddress.Loopback, 1), new(System.Net.IPAddress.Loopback, 2), new(System.Net.IPAddress.Loopback, 3)],
            ScrubInterval = TimeSpan.Zero,
        };
        // A clock that never moves: no tick runs the loop on a timer thread during the measurement.
        _volume = ReplicatedVolume.StartAsync(options, NullLogger.Instance, new InlineDownstairs(BlockSize, Blocks), CancellationToken.None, time: new FakeTimeProvider())
            .GetAwaiter().GetResult();
    }

    [GlobalCleanup]
    public void Cleanup() => _volume.DisposeAsync().AsTask().GetAwaiter().GetResult();

    [Benchmark]
    public ValueTask Write4k() => _volume.WriteAsync(NextOffset(), _block, WriteOptions.None, CancellationToken.None);

    [Benchmark]
    public ValueTask Read4k() => _volume.ReadAsync(NextOffset(), _block, CancellationToken.None);

    private long NextOffset() => (_next++ % Blocks) * BlockSize;
}

public static class Program
{
    public static void Main(string[] args) => BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args);
}

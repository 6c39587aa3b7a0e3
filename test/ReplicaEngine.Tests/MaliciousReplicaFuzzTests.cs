using System.Diagnostics;
using System.IO.Pipelines;
using Microsoft.Extensions.Time.Testing;
using Nerdbank.Streams;
using NbdServer.Common.Volumes;
using NbdServer.Protocol;
using NbdServer.Downstairs.Tests;
using NbdServer.Testing;

namespace NbdServer.ReplicaEngine.Tests;

/// <summary>
/// The engine with one replica that lies (<see cref="MaliciousDownstairs"/> behind a real
/// <see cref="DownstairsClient"/>, a fresh lying session on every reconnect) and two honest ones:
/// the guest's writes, flushes and reads go on and return what was written, the engine never
/// crashes, and its memory stays bounded. Seeded (NBD_FUZZ_SEED replays), NBD_FUZZ_SECONDS runs longer.
/// </summary>
[TestFixture]
[Category("Fuzz")]
[CancelAfter(Fuzz.MaxSeconds * 1000 + 120_000)]
public sealed class MaliciousReplicaFuzzTests
{
    private const int Liar = 2;

    /// <summary>Heap growth allowed over a run: the fakes hold 64 KiB each; a peer-sized allocation would be far beyond.</summary>
    private const long HeapGrowthBound = 256L << 20;

    [Test]
    public async Task A_lying_replica_is_failed_and_the_guest_is_served_by_the_other_two()
    {
        int seed = Fuzz.Seed();
        TimeSpan budget = Fuzz.Budget(6);
        await using var cluster = new Cluster();
        var connector = new LyingConnector(cluster.Replicas, seed);
        ReplicatedVolume volume;
        var time = new FakeTimeProvider();
        using (var start = new CancellationTokenSource(Cluster.Patience))
        {
            // A liar that stops answering is faulted after this: short, so a run sees many lying sessions.
            EngineOptions options = Cluster.Options() with { NoProgressTimeout = TimeSpan.FromMilliseconds(300) };
            volume = await ReplicatedVolume.StartAsync(options, cluster.Log, connector, start.Token, time: time);
        }
        // The engine's clock moves while the guest waits, and only while the honest replicas have
        // nothing outstanding: a silent liar meets its deadlines, an honest replica merely slow in
        // real time never does.
        void AdvanceIfHonestAreIdle()
        {
            ReplicaStatus[] replicas = volume.GetStatus().Replicas;
            if (replicas[0].OutstandingJobs == 0 && replicas[1].OutstandingJobs == 0)
            {
                time.Advance(Engine.TickInterval);
            }
        }
        async Task AdvanceWhileWaitingAsync(Task guest)
        {
            while (!guest.IsCompleted)
            {
                AdvanceIfHonestAreIdle();
                await Task.WhenAny(guest, Task.Delay(1));
            }
            await guest;
        }
        await using (volume)
        {
            long heapBefore = GC.GetTotalMemory(forceFullCollection: true);
            // From now on every (re)connection of replica 2 is a lying session.
            connector.Lying = true;
            cluster.Replicas[Liar].DropConnection();

            var clock = Stopwatch.StartNew();
            var rng = new Random(seed);
            int round = 0;
            for (; round < Fuzz.MaxIterations && clock.Elapsed < budget; round++)
            {
                long block = rng.Next(0, (int)cluster.Replicas[0].BlockCount - 4);
                int blocks = rng.Next(1, 4);
                byte[] data = Cluster.Pattern(seed + round, block, blocks);
                using var cancel = new CancellationTokenSource(Cluster.Patience);
                string replay = $"{Fuzz.Replay(seed, round)}; liar sessions {connector.Sessions}";
                await AdvanceWhileWaitingAsync(volume.WriteAsync(block * Cluster.BlockSize, data, WriteOptions.None, cancel.Token).AsTask().WaitAsync(cancel.Token));
                if (rng.Next(4) == 0)
                {
                    await AdvanceWhileWaitingAsync(volume.FlushAsync(cancel.Token).AsTask().WaitAsync(cancel.Token));
                }
                byte[] back = new byte[data.Length];
                await AdvanceWhileWaitingAsync(volume.ReadAsync(block * Cluster.BlockSize, back, cancel.Token).AsTask().WaitAsync(cancel.Token));
                Assert.That(back, Is.EqualTo(data), $"the guest read something else than it wrote; {replay}");
                AdvanceIfHonestAreIdle(); // every round lets the engine's time move on
            }
            TestContext.Out.WriteLine($"{round} guest rounds against {connector.Sessions} lying sessions in {clock.Elapsed.TotalSeconds:0.0} s; replica {Liar}: {volume.GetStatus().Replicas[Liar].State}, {volume.GetStatus().Replicas[Liar].Faults} faults");

            EngineStatus status = volume.GetStatus();
            Assert.That(status.Replicas[0].State, Is.EqualTo(ReplicaState.Active), $"seed {seed}");
            Assert.That(status.Replicas[1].State, Is.EqualTo(ReplicaState.Active), $"seed {seed}");
            Assert.That(connector.Sessions, Is.GreaterThan(0), "the liar was never connected: nothing was fuzzed");
            Assert.That(GC.GetTotalMemory(forceFullCollection: true) - heapBefore, Is.LessThan(HeapGrowthBound), $"the engine's heap grew; seed {seed}");
        }
    }

    /// <summary>Replicas 0 and 1 are the fakes; replica 2 is a real client over a pipe to a lying downstairs once <see cref="Lying"/> is set.</summary>
    private sealed class LyingConnector(FakeReplica[] replicas, int seed) : IDownstairsConnector
    {
        private int _sessions;

        public volatile bool Lying;

        public int Sessions => Volatile.Read(ref _sessions);

        public async Task<IDownstairs> ConnectAsync(int replica, HelloRequest hello, IDownstairsReplyHandler replies, CancellationToken cancellationToken)
        {
            if (replica != Liar || !Lying)
            {
                return await replicas[replica].ConnectAsync(hello, replies, cancellationToken);
            }
            int session = Interlocked.Increment(ref _sessions);
            FakeReplica r = replicas[replica];
            var honest = new HelloReply(Wire.ProtocolVersion, hello.ReadOnly, r.RegionId, r.BlockSize, r.ExtentBlocks, r.ExtentCount,
                Wire.DefaultMaxFrameBytes, 1024, hello.Generation, r.Snapshot().Meta);
            (Stream client, Stream server) = FullDuplexStream.CreatePair(new PipeOptions(pauseWriterThreshold: 8 << 20, resumeWriterThreshold: 4 << 20));
            _ = Task.Run(() => MaliciousDownstairs.RunAsync(server, new Random(seed + session), honest, MaliciousDownstairs.HelloMode.Lying, CancellationToken.None), CancellationToken.None);
            using var helloTimeout = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
            helloTimeout.CancelAfter(TimeSpan.FromSeconds(1));
            try
            {
                return new TcpDownstairsConnector.ClientAdapter(await DownstairsClient.ConnectAsync(client, hello, new DownstairsClientOptions(), helloTimeout.Token), replies);
            }
            catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
            {
                // A Hello reply that never completes: what the TCP connect timeout turns into.
                throw new DownstairsConnectionException("no Hello reply in time");
            }
        }
    }
}

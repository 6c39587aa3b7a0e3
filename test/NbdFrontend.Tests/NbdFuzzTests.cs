using System.Buffers.Binary;
using System.Diagnostics;
using System.IO.Pipelines;
using System.Text;
using Nerdbank.Streams;
using NbdServer.Nbd;
using NbdServer.Frontend.Server;
using NbdServer.Frontend.Volumes;
using NbdServer.Testing;
using static NbdServer.Frontend.Tests.NbdTestClient;

namespace NbdServer.Frontend.Tests;

/// <summary>
/// Random and mutated NBD byte streams (handshake, option haggling, transmission requests) into
/// the in-process frontend: every connection is answered or closed and ends when its client goes;
/// a well-behaved client on another export is served correctly meanwhile and afterwards; memory
/// stays bounded. Seeded (NBD_FUZZ_SEED replays), NBD_FUZZ_SECONDS runs longer.
/// </summary>
[TestFixture]
[Category("Fuzz")]
[CancelAfter(Fuzz.MaxSeconds * 1000 + 120_000)]
public sealed class NbdFuzzTests
{
    private const long FuzzedSize = 16L << 20;
    private const long CheckSize = 1L << 20;
    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(10);

    /// <summary>Heap growth allowed over a whole run: the volumes are 17 MiB; anything kept per connection would pile up far beyond.</summary>
    private const long HeapGrowthBound = 256L << 20;

    [Test]
    public async Task Random_handshakes_and_requests_never_stop_the_server_from_serving_a_real_client()
    {
        int seed = Fuzz.Seed();
        TimeSpan budget = Fuzz.Budget(6);
        await using var server = new TestServer(
            new FrontendOptions { HandshakeTimeout = TimeSpan.FromSeconds(5) },
            new NbdExport("vol0", new MemoryVolume(FuzzedSize), "fuzzed"),
            new NbdExport("check", new MemoryVolume(CheckSize), "the well-behaved client's"));
        await using NbdTestClient real = server.Connect();
        await real.ConnectAsync("check");
        long heapBefore = GC.GetTotalMemory(forceFullCollection: true);

        var clock = Stopwatch.StartNew();
        int iteration = 0;
        for (; iteration < Fuzz.MaxIterations && clock.Elapsed < budget; iteration++)
        {
            var rng = new Random(seed + iteration);
            string replay = Fuzz.Replay(seed, iteration);
            byte[] input = Session(rng);
            (Stream client, Stream serverSide) = FullDuplexStream.CreatePair(new PipeOptions(pauseWriterThreshold: 1 << 20, resumeWriterThreshold: 512 << 10));
            Task served = server.Listener.ServeAsync(serverSide);
            using (var cancel = new CancellationTokenSource(Patience))
            {
                // Most clients read their answers; some never read a byte (the server must not wait on them forever).
                Task drained = rng.Next(8) == 0 ? Task.CompletedTask : Fuzz.DrainAsync(client, cancel.Token);
                try
                {
                    await Fuzz.WriteInPiecesAsync(client, rng, input, cancel.Token);
                }
                catch (Exception e) when (e is IOException or ObjectDisposedException or InvalidOperationException)
                {
                    // The server hung up on a bad stream before we finished: allowed.
                }
                if (rng.Next(2) == 0)
                {
                    await Task.WhenAny(drained, Task.Delay(10, CancellationToken.None));
                }
                await client.DisposeAsync();
                Assert.That(await Task.WhenAny(served, Task.Delay(Patience, CancellationToken.None)), Is.SameAs(served), $"the connection outlived its client; {replay}");
                Assert.That(served.IsFaulted, Is.False, $"the connection task faulted: {served.Exception}; {replay}");
                await drained;
            }
            if (iteration % 16 == 0)
            {
                await AssertServesAsync(real, rng, replay);
            }
        }
        int attached = server.Logger.Lines.Count(l => l.Message.Contains("attached to export 'vol0'", StringComparison.Ordinal));
        TestContext.Out.WriteLine($"{iteration} fuzz connections ({attached} reached transmission) in {clock.Elapsed.TotalSeconds:0.0} s");
        Assert.That(attached, Is.GreaterThan(0), "no fuzz connection reached the transmission phase: its parser went unexercised");

        await AssertServesAsync(real, new Random(seed), $"seed {seed}, after fuzzing");
        await using (NbdTestClient fresh = server.Connect())
        {
            (ulong size, _) = await fresh.ConnectAsync("check");
            Assert.That(size, Is.EqualTo((ulong)CheckSize));
            await AssertServesAsync(fresh, new Random(seed + 1), $"seed {seed}, a new connection after fuzzing");
        }
        Assert.That(GC.GetTotalMemory(forceFullCollection: true) - heapBefore, Is.LessThan(HeapGrowthBound), $"the heap grew; seed {seed}");
    }

    /// <summary>A write of a recognisable pattern, read back equal, both answered within the patience.</summary>
    private static async Task AssertServesAsync(NbdTestClient client, Random rng, string replay)
    {
        const int length = 8192;
        ulong offset = (ulong)rng.Next(0, (int)(CheckSize / length)) * length;
        byte[] pattern = new byte[length];
        rng.NextBytes(pattern);
        using var cancel = new CancellationTokenSource(Patience);
        await client.SendRequestAsync(NbdCommand.Write, offset, length, cookie: 1, payload: pattern).WaitAsync(cancel.Token);
        (NbdError written, _, _) = await client.ReadSimpleReplyAsync().WaitAsync(cancel.Token);
        await client.SendRequestAsync(NbdCommand.Read, offset, length, cookie: 2).WaitAsync(cancel.Token);
        (NbdError read, _, byte[] back) = await client.ReadSimpleReplyAsync(length).WaitAsync(cancel.Token);
        Assert.That((written, read), Is.EqualTo((NbdError.None, NbdError.None)), replay);
        Assert.That(back, Is.EqualTo(pattern), replay);
    }

    /// <summary>One client's bytes: flags, some options, usually GO, then requests; pieces mutated now and then.</summary>
    private static byte[] Session(Random rng)
    {
        var bytes = new List<byte>();
        void Add(byte[] piece) => bytes.AddRange(rng.Next(5) == 0 ? Fuzz.Mutate(rng, piece) : piece);

        Add(BigEndian32(rng.Next(6) == 0 ? (uint)Fuzz.Extreme(rng) : 3));
        int options = rng.Next(0, 5);
        for (int i = 0; i < options; i++)
        {
            Add(RandomOption(rng));
        }
        int ending = rng.Next(10);
        if (ending < 7)
        {
            Add(Option(NbdOption.Go, InfoRequest(ExportName(rng), [.. Enumerable.Range(0, rng.Next(0, 4)).Select(_ => (InfoType)rng.Next(0, 6))])));
        }
        else if (ending == 7)
        {
            Add(Option(NbdOption.ExportName, Encoding.UTF8.GetBytes(ExportName(rng))));
        }
        else if (ending == 8)
        {
            Add(Option(NbdOption.Abort, []));
        }
        int requests = ending <= 7 ? rng.Next(0, 16) : 0;
        for (int i = 0; i < requests; i++)
        {
            Add(Request(rng));
        }
        if (rng.Next(8) == 0)
        {
            byte[] garbage = new byte[rng.Next(1, 64)];
            rng.NextBytes(garbage);
            bytes.AddRange(garbage);
        }
        return [.. bytes];
    }

    private static string ExportName(Random rng) => rng.Next(6) switch
    {
        0 => "",
        1 => "no-such-export",
        2 => new string('x', rng.Next(1, 5000)),
        _ => "vol0",
    };

    private static byte[] Option(NbdOption option, byte[] data)
    {
        byte[] header = new byte[16];
        BinaryPrimitives.WriteUInt64BigEndian(header, NbdMagic.Option);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(8), (uint)option);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(12), (uint)data.Length);
        return [.. header, .. data];
    }

    private static byte[] RandomOption(Random rng)
    {
        switch (rng.Next(10))
        {
            case 0:
                return Option(NbdOption.StructuredReply, []);
            case 1:
                return Option(NbdOption.SetMetaContext, MetaContextRequest(ExportName(rng), "base:allocation"));
            case 2:
                return Option(NbdOption.ListMetaContext, MetaContextRequest(ExportName(rng), rng.Next(2) == 0 ? "base:" : "qemu:dirty-bitmap:x"));
            case 3:
                return Option(NbdOption.List, []);
            case 4:
                return Option(NbdOption.Info, InfoRequest(ExportName(rng), InfoType.BlockSize, InfoType.Description));
            case 5:
                return Option((NbdOption)rng.Next(4, 12), []);
            case 6:
            {
                // A length that promises more than follows (up to 4 GiB).
                byte[] header = Option((NbdOption)rng.Next(0, 16), []);
                BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(12), (uint)Fuzz.Extreme(rng));
                return header;
            }
            default:
            {
                byte[] data = new byte[rng.Next(0, 128)];
                rng.NextBytes(data);
                return Option((NbdOption)(rng.Next(3) == 0 ? (uint)Fuzz.Extreme(rng) : (uint)rng.Next(0, 16)), data);
            }
        }
    }

    private static byte[] Request(Random rng)
    {
        var command = (NbdCommand)(rng.Next(10) == 0 ? rng.Next(0, 0x10000) : rng.Next(0, 9));
        ulong offset = rng.Next(4) switch
        {
            0 => Fuzz.Extreme(rng),
            1 => (ulong)FuzzedSize - (ulong)rng.Next(0, 8192),
            _ => (ulong)rng.Next(0, (int)FuzzedSize),
        };
        uint length = rng.Next(4) == 0 ? (uint)Fuzz.Extreme(rng) : (uint)rng.Next(0, 65536);
        var flags = (CommandFlags)(rng.Next(4) == 0 ? rng.Next(0, 0x10000) : rng.Next(0, 32));
        byte[] header = new byte[NbdRequest.Size];
        new NbdRequest(NbdMagic.Request, flags, command, (ulong)rng.NextInt64(), offset, length).Write(header);
        if (command != NbdCommand.Write)
        {
            return header;
        }
        // The payload: as long as announced (up to 64 KiB), or cut short.
        byte[] payload = new byte[Math.Min(length, 65536) / (uint)(rng.Next(4) == 0 ? 2 : 1)];
        rng.NextBytes(payload);
        return [.. header, .. payload];
    }
}

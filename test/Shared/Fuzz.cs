using System.Buffers.Binary;

namespace NbdServer.Testing;

/// <summary>
/// Budget, seed and byte mutations shared by the wire fuzz tests. CI runs each test for a few
/// seconds; <c>scripts/fuzz.sh</c> sets <see cref="SecondsVariable"/> for a longer run. Every run
/// prints its seed; <see cref="SeedVariable"/> replays one (each connection's input is drawn from
/// its own <c>Random(seed + index)</c>, so the same inputs come back in the same order).
/// </summary>
internal static class Fuzz
{
    public const string SecondsVariable = "NBD_FUZZ_SECONDS";
    public const string SeedVariable = "NBD_FUZZ_SEED";

    /// <summary>Upper bound on iterations whatever the time budget, so no loop runs unbounded.</summary>
    public const int MaxIterations = 1_000_000;

    /// <summary>Longest budget the tests' [CancelAfter] allows for (fuzz.sh refuses more).</summary>
    public const int MaxSeconds = 3000;

    private static readonly ulong[] Interesting64 =
        [0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0x1_0000_0000,
         0x7FFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFE, 4096, 4095, 512, 1 << 20, 32 << 20];

    /// <summary>The time budget: <see cref="SecondsVariable"/> if set, else <paramref name="ciSeconds"/>.</summary>
    public static TimeSpan Budget(double ciSeconds)
    {
        string? text = Environment.GetEnvironmentVariable(SecondsVariable);
        double seconds = double.TryParse(text, System.Globalization.NumberStyles.AllowDecimalPoint, System.Globalization.CultureInfo.InvariantCulture, out double s) && s > 0 ? s : ciSeconds;
        return TimeSpan.FromSeconds(Math.Min(seconds, MaxSeconds));
    }

    /// <summary>The run's seed (from <see cref="SeedVariable"/> or fresh), printed so a failure replays.</summary>
    public static int Seed()
    {
        int seed = int.TryParse(Environment.GetEnvironmentVariable(SeedVariable), System.Globalization.NumberStyles.AllowLeadingSign, System.Globalization.CultureInfo.InvariantCulture, out int s)
            ? s
            : Random.Shared.Next();
        TestContext.Out.WriteLine($"fuzz seed {seed} (replay: {SeedVariable}={seed})");
        return seed;
    }

    public static string Replay(int seed, int iteration) => $"seed {seed}, iteration {iteration} (replay: {SeedVariable}={seed})";

    /// <summary>A value from the list of boundary cases, or a random one.</summary>
    public static ulong Extreme(Random rng) => rng.Next(3) switch
    {
        0 => Interesting64[rng.Next(Interesting64.Length)],
        1 => Interesting64[rng.Next(Interesting64.Length)] + (ulong)rng.Next(-2, 3),
        _ => (ulong)rng.NextInt64() ^ ((ulong)rng.Next(2) << 63),
    };

    /// <summary>One to four random edits: bit flips, boundary integers (either byte order), inserts, deletes, truncation.</summary>
    public static byte[] Mutate(Random rng, byte[] input)
    {
        var bytes = new List<byte>(input);
        int edits = rng.Next(1, 5);
        for (int e = 0; e < edits; e++)
        {
            int at = bytes.Count == 0 ? 0 : rng.Next(bytes.Count);
            switch (rng.Next(7))
            {
                case 0 when bytes.Count > 0:
                    bytes[at] ^= (byte)(1 << rng.Next(8));
                    break;
                case 1 when bytes.Count > 0:
                    bytes[at] = (byte)Interesting64[rng.Next(Interesting64.Length)];
                    break;
                case 2 when bytes.Count >= 8:
                {
                    at = Math.Min(at, bytes.Count - 8);
                    Span<byte> v = stackalloc byte[8];
                    ulong value = Extreme(rng);
                    if (rng.Next(2) == 0)
                    {
                        BinaryPrimitives.WriteUInt64LittleEndian(v, value);
                    }
                    else
                    {
                        BinaryPrimitives.WriteUInt64BigEndian(v, value);
                    }
                    int width = rng.Next(2) == 0 ? 4 : 8;
                    for (int i = 0; i < width; i++)
                    {
                        bytes[at + i] = v[rng.Next(2) == 0 ? i : 8 - width + i];
                    }
                    break;
                }
                case 3:
                {
                    byte[] extra = new byte[rng.Next(1, 17)];
                    rng.NextBytes(extra);
                    bytes.InsertRange(at, extra);
                    break;
                }
                case 4 when bytes.Count > 0:
                    bytes.RemoveRange(at, Math.Min(rng.Next(1, 17), bytes.Count - at));
                    break;
                case 5 when bytes.Count > 0:
                    bytes.RemoveRange(at, bytes.Count - at);
                    break;
                default:
                    if (bytes.Count > 0)
                    {
                        int length = Math.Min(rng.Next(1, 33), bytes.Count - at);
                        bytes.InsertRange(at, bytes.GetRange(at, length));
                    }
                    break;
            }
        }
        return [.. bytes];
    }

    /// <summary>Writes <paramref name="bytes"/> in random-sized pieces (a parser must not assume a frame arrives whole).</summary>
    public static async Task WriteInPiecesAsync(Stream stream, Random rng, byte[] bytes, CancellationToken cancel)
    {
        int offset = 0;
        while (offset < bytes.Length)
        {
            int n = rng.Next(4) == 0 ? rng.Next(1, 8) : bytes.Length - offset;
            n = Math.Min(n, bytes.Length - offset);
            await stream.WriteAsync(bytes.AsMemory(offset, n), cancel);
            offset += n;
        }
        await stream.FlushAsync(cancel);
    }

    /// <summary>Reads and discards until the peer closes (or the token fires): the fuzzer never makes the server wait on it.</summary>
    public static async Task<long> DrainAsync(Stream stream, CancellationToken cancel)
    {
        byte[] buffer = new byte[64 << 10];
        long total = 0;
        try
        {
            int n;
            while ((n = await stream.ReadAsync(buffer, cancel)) > 0)
            {
                total += n;
            }
        }
        catch (Exception e) when (e is IOException or ObjectDisposedException or OperationCanceledException or InvalidOperationException)
        {
            // The connection ended under us (an in-process pipe completed mid-read says so with
            // InvalidOperationException): what we wanted to know.
        }
        return total;
    }
}

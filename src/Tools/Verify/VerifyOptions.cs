using System.Globalization;
using NbdServer.Common.Text;

namespace NbdServer.Tools.Verify;

internal sealed record VerifyOptions
{
    public const string Usage = """
        nbd-verify - drive an NBD export with a write log and check it

        SYNOPSIS
            nbd-verify --uri nbd://HOST:PORT[/EXPORT] [OPTIONS]
            nbd-verify --uri nbd://HOST:PORT[/EXPORT] --check-only --log FILE

        DESCRIPTION
            A block-device torture tester. Every block it writes carries its index, a per-block write
            counter and a checksum; the write log (in memory, and in FILE with --log) records per block
            the last acknowledged write and the last write acknowledged before a successful FLUSH.
            For --duration seconds it keeps --qd requests in flight (random single-block reads and
            writes, a FLUSH every --flush-every acknowledged writes), printing per second the IOs
            completed and the longest single-IO latency. Then it flushes and reads the whole range
            back: a block older than its last acknowledged write (online) or its last flushed write
            (after the server crashed, or with --check-only), or one holding data never written
            (torn, rotted, misplaced), is reported and counted wrong. The last line is a summary of
            key=value figures.
            SIGINT or SIGTERM ends the load early; the final flush and the read-back still run.
            Works against any NBD server (fixed newstyle, simple replies).

        OPTIONS
            --uri URI             nbd://HOST:PORT[/EXPORT] (port default 10809, export default "")
            --duration SECONDS    load phase length (default 10; 0: no load, just verify)
            --qd N                requests in flight (default 16)
            --block-size N        verifier block size, >= 512 (default 4096)
            --offset BYTES        first byte of the device to use (default 0)
            --range BYTES         bytes of the device to use (default: all of it after --offset)
            --seed N              random seed (default: time based)
            --read-percent P      share of reads in the load (default 30)
            --flush-every N       FLUSH after every N acknowledged writes (default 64; 0: only at the end)
            --log FILE            keep the write log in FILE: loaded if it exists (the run continues it),
                                  saved at the end, also when the connection is lost
            --check-only          no load: verify the device against --log FILE and exit
            --no-verify           skip the final read-back
            --drain-timeout S     how long to wait for requests still in flight at the end (default 30)
            --json                per-second figures and the summary as JSON lines
            --quiet               no per-second lines

        EXIT STATUS
            0 every block checked is right; 1 wrong blocks found; 2 usage error; 3 connection lost or
            could not connect (the log is saved; verify later with --check-only).
        """;

    public Uri? Uri { get; init; }
    public double DurationSeconds { get; init; } = 10;
    public int QueueDepth { get; init; } = 16;
    public int BlockSize { get; init; } = 4096;
    public long Offset { get; init; }
    public long? Range { get; init; }
    public int? Seed { get; init; }
    public int ReadPercent { get; init; } = 30;
    public int FlushEvery { get; init; } = 64;
    public string? LogPath { get; init; }
    public bool CheckOnly { get; init; }
    public bool NoVerify { get; init; }
    public double DrainTimeoutSeconds { get; init; } = 30;
    public bool Json { get; init; }
    public bool Quiet { get; init; }
    public bool Help { get; init; }

    public static VerifyOptions Parse(IReadOnlyList<string> args)
    {
        var o = new VerifyOptions();
        for (int i = 0; i < args.Count; i++)
        {
            string arg = args[i];
            string Value() => i + 1 < args.Count ? args[++i] : throw new ArgumentException($"{arg} needs a value");
            int Int(int min) => int.Parse(Value(), NumberStyles.None, CultureInfo.InvariantCulture) is var v && v >= min ? v : throw new ArgumentException($"{arg} must be >= {min}");
            double Seconds() => double.Parse(Value(), NumberStyles.Float, CultureInfo.InvariantCulture) is var v && v >= 0 ? v : throw new ArgumentException($"{arg} must be >= 0");
            o = arg switch
            {
                "--uri" => o with { Uri = new Uri(Value()) },
                "--duration" => o with { DurationSeconds = Seconds() },
                "--qd" => o with { QueueDepth = Int(1) },
                "--block-size" => o with { BlockSize = Int(BlockPattern.MinBlockSize) },
                "--offset" => o with { Offset = ByteSize.Parse(Value(), arg) },
                "--range" => o with { Range = ByteSize.Parse(Value(), arg) },
                "--seed" => o with { Seed = int.Parse(Value(), NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture) },
                "--read-percent" => o with { ReadPercent = Math.Min(100, Int(0)) },
                "--flush-every" => o with { FlushEvery = Int(0) },
                "--log" => o with { LogPath = Value() },
                "--check-only" => o with { CheckOnly = true },
                "--no-verify" => o with { NoVerify = true },
                "--drain-timeout" => o with { DrainTimeoutSeconds = Seconds() },
                "--json" => o with { Json = true },
                "--quiet" => o with { Quiet = true },
                "-h" or "--help" => o with { Help = true },
                _ => throw new ArgumentException($"unknown option '{arg}' (see --help)"),
            };
        }
        if (!o.Help && o.Uri is null)
        {
            throw new ArgumentException("--uri is required");
        }
        if (o.CheckOnly && o.LogPath is null)
        {
            throw new ArgumentException("--check-only needs --log FILE");
        }
        if (o.BlockSize % 512 != 0)
        {
            throw new ArgumentException("--block-size must be a multiple of 512");
        }
        return o;
    }
}

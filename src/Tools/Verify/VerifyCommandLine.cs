using System.CommandLine;
using NbdServer.Common.Cli;

namespace NbdServer.Tools.Verify;

/// <summary>The command line of <c>nbd-verify</c> (System.CommandLine).</summary>
internal static class VerifyCommandLine
{
    private static readonly Lazy<CliProgram> Shared = new(Create);

    public static CliProgram Program => Shared.Value;

    private static CliProgram Create()
    {
        var program = new CliProgram("nbd-verify", "drive an NBD export with a write log and check it", new CommandDoc
        {
            Synopsis =
            [
                "nbd-verify --uri nbd://HOST:PORT[/EXPORT] [OPTIONS]",
                "nbd-verify --uri nbd://HOST:PORT[/EXPORT] --check-only --log FILE",
            ],
            Description = """
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
                """,
            Sections =
            [
                ("EXIT STATUS", """
                    0 every block checked is right; 1 wrong blocks found; 2 usage error; 3 connection lost or
                    could not connect (the log is saved; verify later with --check-only).
                    """),
            ],
        });
        Option[] options =
        [
            Settings.Value("--uri", "URI", "nbd://HOST:PORT[/EXPORT] (port default 10809, export default \"\")"),
            Settings.Value("--duration", "SECONDS", "load phase length (default 10; 0: no load, just verify)"),
            Settings.Value("--qd", "N", "requests in flight (default 16)"),
            Settings.Value("--block-size", "N", "verifier block size, >= 512 (default 4096)"),
            Settings.Value("--offset", "BYTES", "first byte of the device to use (default 0)"),
            Settings.Value("--range", "BYTES", "bytes of the device to use (default: all of it after --offset)"),
            Settings.Value("--seed", "N", "random seed (default: time based)"),
            Settings.Value("--read-percent", "P", "share of reads in the load (default 30)"),
            Settings.Value("--flush-every", "N", "FLUSH after every N acknowledged writes (default 64; 0: only at the end)"),
            Settings.Value("--log", "FILE", "keep the write log in FILE: loaded if it exists (the run continues it), saved at the end, also when the connection is lost"),
            Settings.Flag("--check-only", "no load: verify the device against --log FILE and exit"),
            Settings.Flag("--no-verify", "skip the final read-back"),
            Settings.Value("--drain-timeout", "S", "how long to wait for requests still in flight at the end (default 30)"),
            Settings.Flag("--json", "per-second figures and the summary as JSON lines"),
            Settings.Flag("--quiet", "no per-second lines"),
        ];
        foreach (Option option in options)
        {
            program.Root.Add(option);
        }
        program.Root.SetAction((r, _) => VerifyCommand.RunAsync(VerifyOptions.Bind(name => options.First(o => o.Name == name) switch
        {
            Option<string[]> value => r.Last(value),
            Option<bool> flag => r.GetValue(flag) ? "true" : null,
            _ => null,
        })));
        return program.Seal();
    }
}

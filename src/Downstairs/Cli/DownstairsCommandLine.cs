using System.CommandLine;
using System.Globalization;
using NbdServer.Common.Cli;
using NbdServer.Common.Tls;
using NbdServer.Downstairs.Server;

namespace NbdServer.Downstairs.Cli;

/// <summary>
/// The command line of <c>nbd-downstairs</c> (System.CommandLine): create, run, info, compare, bench.
/// <c>run</c> also takes its settings from the config file and <c>NBD_DOWNSTAIRS_*</c> variables.
/// </summary>
internal static class DownstairsCommandLine
{
    public const string EnvironmentPrefix = "NBD_DOWNSTAIRS_";
    public const string DefaultConfigFile = "/etc/nbd-server/nbd-downstairs.json";

    private static readonly Lazy<CliProgram> Shared = new(Create);

    public static CliProgram Program => Shared.Value;

    /// <summary>The settings of <c>run</c>: options, config keys and variables.</summary>
    internal static class Run
    {
        public static readonly Option<string[]> Data = Settings.Value("--data", "DIR", "Region directory (from `create`).");
        public static readonly Option<string[]> Listen = Settings.Value("--listen", "ADDRESS:PORT", "Address to listen on (default 127.0.0.1:3810).");
        public static readonly Option<string[]> IoThreads = Settings.Value("--io-threads", "N", "Threads doing blocking file IO (default 2).");
        public static readonly Option<string[]> MaxJobs = Settings.Value("--max-jobs", "N", "Jobs per connection admitted but not yet answered (default 1024).");
        public static readonly Option<string[]> MaxBytes = Settings.Value("--max-bytes", "SIZE",
            "Payload bytes per connection held in memory (default 64MiB). When either limit is reached the downstairs stops reading that connection until replies have been sent: memory stays flat.");
        public static readonly Option<string[]> MaxFrame = Settings.Value("--max-frame", "SIZE", "Largest frame body (default 33MiB: a 32 MiB write plus hashes).");
        public static readonly Option<string[]> MaxConnections = Settings.Value("--max-connections", "N",
            "Connections besides the writer, and separately connections that have not said Hello yet (default 16 each). The writer (a read-write Hello that passes fencing) is always admitted; a new connection evicts the oldest one still silent.");
        public static readonly Option<string[]> HelloTimeout = Settings.Value("--hello-timeout", "SECONDS", "Drop a peer that has not negotiated by then (default 10).");
        public static readonly Option<string[]> TlsDir = Settings.Value("--tls-dir", "DIR",
            "Require mutual TLS: DIR holds ca-cert.pem, server-cert.pem and server-key.pem (make them with nbd-certs). A client must present a certificate issued by ca-cert.pem before anything else is read. Default: plaintext, refused on a non-loopback --listen.");
        public static readonly Option<string[]> TlsAllowClient = Settings.Value("--tls-allow-client", "NAMES",
            "Comma list of client certificate names (common name or DNS name) allowed to connect (default: upstairs, the name the README gives the upstairs' certificate; * allows any certificate from the CA, which also lets NBD clients of that CA in).");
        public static readonly Option<string[]> TlsHandshakeTimeout = Settings.Value("--tls-handshake-timeout", "SECONDS",
            "Drop a peer that has not completed the TLS handshake by then (default 10).");
        public static readonly Option<bool> Insecure = Settings.Flag("--insecure",
            "Allow plaintext on a non-loopback --listen (anyone who can reach the port can then read and overwrite the region).");
        public static readonly Option<string[]> IdleTimeout = Settings.Value("--idle-timeout", "SECONDS",
            "Close a negotiated connection that sends nothing for this long (default 30; the engine pings an idle link every 5 s).");
        public static readonly Option<string[]> FrameTimeout = Settings.Value("--frame-timeout", "SECONDS",
            "Once a frame has begun to arrive, all of it must arrive within this time (default 30).");
        public static readonly Option<string[]> SendTimeout = Settings.Value("--send-timeout", "SECONDS",
            "A reply batch the peer has not read within this time closes the connection, returning its memory (default 30).");
        public static readonly Option<string[]> MaxMemory = Settings.Value("--max-memory", "SIZE",
            "Frame bodies being received plus payloads in flight, over all connections (default 512MiB; at least twice the sum of max-bytes and max-frame, which is the share reserved for the writer). A connection that would exceed it waits, unread.");
        public static readonly Option<string[]> MaxGenerationStep = Settings.Value("--max-generation-step", "N",
            "How far one read-write Hello may raise the region's highest generation (default 1000000). Stops a peer from recording 2^64-1, after which no upstairs could ever start again.");
        public static readonly Option<string[]> MaxFlushStep = Settings.Value("--max-flush-step", "N",
            "How far a flush or repair commit may put a flush number above the highest this region has recorded (default 2^40). Stops a peer from recording 2^63-1, after which every flush is refused.");
        public static readonly Option<string[]> LogInterval = Settings.Value("--log-interval", "SECONDS", "Repeated errors are summarised once per interval (default 5).");
        public static readonly Option<string[]> ReceiveBuffer = Settings.Value("--receive-buffer", "SIZE", "Socket read size per connection (default 64K).");
        public static readonly Option<bool> StickyDirty = Settings.Flag("--sticky-dirty",
            "Keep an extent written since the last flush marked dirty across that flush (cleared by the next flush that finds it idle). Saves a metadata fdatasync before the first write after each flush; costs more repair after a crash. Default off.");
        public static readonly Option<bool> Verbose = Settings.Flag("--verbose", "Debug logging.");
        public static readonly Option<string[]> LogJson = Settings.Value("--log-json", "FILE", "Also write every log event as one JSON object per line to FILE.");
        public static readonly Option<string[]> Metrics = Settings.Value("--metrics", "ADDRESS:PORT",
            "Serve Prometheus metrics on http://ADDRESS:PORT/metrics (off by default; use 127.0.0.1).");
        public static readonly Option<string[]> Config = Settings.Value("--config", "FILE",
            "Read settings from FILE (default /etc/nbd-server/nbd-downstairs.json if it exists; or $NBD_DOWNSTAIRS_CONFIG).");

        public static readonly IReadOnlyList<Option> All =
        [
            Data, Listen, IoThreads, MaxJobs, MaxBytes, MaxFrame, MaxConnections, HelloTimeout, TlsDir, TlsAllowClient,
            TlsHandshakeTimeout, Insecure, IdleTimeout, FrameTimeout, SendTimeout, MaxMemory, MaxGenerationStep, MaxFlushStep,
            LogInterval, ReceiveBuffer, StickyDirty, Verbose, LogJson, Metrics,
        ];
    }

    private static CliProgram Create()
    {
        var program = new CliProgram("nbd-downstairs", "durable block storage server (one replica of an nbd-server volume)", new CommandDoc
        {
            Synopsis =
            [
                "nbd-downstairs create --data DIR --size SIZE [--block-size 512|4096] [--extent-size BLOCKS] [--preallocate]",
                "nbd-downstairs run    --data DIR --listen ADDRESS:PORT [OPTIONS]",
                "nbd-downstairs info   --data DIR",
                "nbd-downstairs compare DIR DIR [DIR...]",
                "nbd-downstairs completion bash",
                "nbd-downstairs COMMAND --help",
            ],
            Description = """
                A downstairs keeps one region (a block device image split into extent files) on local disk and
                serves it to the replica engine over TCP. Every write is checked against its hash, every IO
                error is reported in the reply of the job that hit it, and a flush makes the written data
                durable (fdatasync) before it is acknowledged. See docs/downstairs.md.
                """,
            Sections = [("EXIT STATUS", "0 success, 1 runtime error (damaged region, IO error, address in use), 2 usage error.")],
        });
        // No command: the help, as `nbd-downstairs --help`.
        program.Root.SetAction(r => r.InvocationConfiguration.Output.Write(program.HelpOf(program.Root)));
        var help = new Command("help", "the help") { Hidden = true };
        help.SetAction(r => r.InvocationConfiguration.Output.Write(program.HelpOf(program.Root)));
        program.Add(help, new CommandDoc());

        Option<string[]> createData = Settings.Value("--data", "DIR", "Directory for the region (created if missing; must not hold a region).");
        Option<string[]> size = Settings.Value("--size", "SIZE", "Region size: 512, 64K, 1.5MiB, 8GiB... A whole number of extents.");
        Option<string[]> blockSize = Settings.Value("--block-size", "N", "512 or 4096 (default 4096).", "512", "4096");
        Option<string[]> extentSize = Settings.Value("--extent-size", "BLOCKS",
            "Blocks per extent (default: 32 MiB worth, or the whole region if smaller). An extent is the unit of flush bookkeeping and of live repair.");
        Option<bool> preallocate = Settings.Flag("--preallocate",
            "Allocate every extent file now (fallocate) instead of leaving them sparse. Overwrites then cannot hit ENOSPC, at the cost of the full size on disk up front. Default: sparse (thin), see docs/downstairs.md.");
        var create = new Command("create", "make a new, empty region") { createData, size, blockSize, extentSize, preallocate };
        create.SetAction(r => Commands.Create(Values(r, create)));
        program.Add(create, new CommandDoc
        {
            Synopsis = ["nbd-downstairs create --data DIR --size SIZE [--block-size 512|4096] [--extent-size BLOCKS] [--preallocate]"],
            Sections = [("FILES", "DIR/region.meta, DIR/region.lock, DIR/extents/eNNNNNN.dat")],
        });

        var run = new Command("run", "serve a region to the replica engine");
        foreach (Option option in Run.All)
        {
            run.Add(option);
        }
        run.Add(Run.Config);
        run.SetAction((r, _) => RunAsync(r));
        program.Add(run, new CommandDoc
        {
            Synopsis = ["nbd-downstairs run --data DIR --listen ADDRESS:PORT [OPTIONS]"],
            Description = """
                Opens the region (refusing a damaged one with the name of the file at fault, changing
                nothing), logs "Listening on ADDRESS:PORT" (port 0 picks a free port and logs the real one),
                and serves until SIGINT/SIGTERM.
                """,
            Sections =
            [
                ("CONFIGURATION", """
                    Every option of `run` can also come from the config file, a JSON object whose keys are the
                    option names without dashes ({"data": "/var/lib/nbd-server/r0", "listen": "0.0.0.0:3810",
                    "tls-dir": "/etc/nbd-server/tls"}), or from an environment variable NBD_DOWNSTAIRS_ + the name
                    in capitals with underscores (NBD_DOWNSTAIRS_TLS_DIR=/etc/nbd-server/tls). The command line
                    overrides the environment, which overrides the file; a bad or unknown setting stops the
                    server with one line naming it, where it was set and the rule.
                    """),
                ("SYSTEMD", """
                    A Type=notify service (scripts/systemd/nbd-downstairs@.service): READY=1 once listening,
                    STOPPING=1 on SIGTERM, WATCHDOG=1 every WATCHDOG_USEC/2; journald-style log lines under the
                    journal. SIGTERM stops accepting, lets the IO threads finish the jobs already queued, and
                    closes the region; writes not yet covered by a flush were never acknowledged as durable,
                    and the upstairs repairs those extents when the replica returns.
                    """),
            ],
        });

        Option<string[]> infoData = Settings.Value("--data", "DIR", "Region directory.");
        var info = new Command("info", "print a region's geometry and per-extent state") { infoData };
        info.SetAction(r => Commands.Info(Values(r, info)));
        program.Add(info, new CommandDoc
        {
            Synopsis = ["nbd-downstairs info --data DIR"],
            Description = """
                Reads the region without changing it (works while it is being served) and prints its uuid,
                geometry, highest generation, and per extent: generation, flush number, dirty bit.
                """,
        });

        var dirs = new Argument<string[]>("DIR") { HelpName = "DIR", Arity = new ArgumentArity(0, 64), Description = "region directories" }.OptionsAreNotArguments();
        Option<string[]> maxList = Settings.Value("--max-list", "N", "list at most N differing extents (default 1000; the count is always printed)");
        Option<bool> quiet = Settings.Flag("--quiet", "print only the verdict line");
        var compare = new Command("compare", "check that replicas hold identical blocks and metadata") { dirs, maxList, quiet };
        compare.SetAction(r =>
        {
            string[] given = r.GetValue(dirs) ?? [];
            if (given.Length < 2)
            {
                throw new ArgumentException("compare: give at least two region directories (see --help)");
            }
            int max = r.Last(maxList) is { } m
                ? int.TryParse(m, NumberStyles.None, CultureInfo.InvariantCulture, out int n) ? n : throw new ArgumentException($"compare: --max-list: '{m}' is not a whole number")
                : 1000;
            return CompareCommand.Run(given, max, r.GetValue(quiet), r.InvocationConfiguration.Output, r.InvocationConfiguration.Error);
        });
        program.Add(compare, new CommandDoc
        {
            Synopsis = ["nbd-downstairs compare DIR DIR [DIR...] [--max-list N] [--quiet]"],
            Description = """
                Opens each region read-only (no lock is taken and nothing is written, so it also works while
                a downstairs serves the region; stop them for an exact answer) and compares:
                  - geometry (block size, blocks per extent, extent count); the uuids differ by design;
                  - per extent: generation, flush number and dirty bit of the last durable flush;
                  - per block: the data, and that each copy matches its own stored hash (a copy whose hash
                    does not match its data is rotten or torn, even if the data happens to agree).
                A block never written (stored hash 0, all zeroes) equals a block written with zeroes.
                Every differing extent is listed with what differs.
                """,
            Sections = [("EXIT STATUS", "0 identical, 1 different, 2 usage error or a region that cannot be opened or read.")],
        });

        var bench = new Command("bench", "load client for scripts/bench-downstairs.sh (not for production)")
        {
            Settings.Value("--target", "ADDRESS:PORT", "the downstairs to drive"),
            Settings.Value("--pattern", "PATTERN", "randwrite, seqwrite or randread", "randwrite", "seqwrite", "randread"),
            Settings.Value("--io-size", "SIZE", "bytes per IO (default 4096)"),
            Settings.Value("--depth", "N", "IOs in flight (default 32)"),
            Settings.Value("--seconds", "S", "how long (default 10)"),
            Settings.Value("--flush-every", "N", "a flush after every N writes (default 64; 0: none)"),
            Settings.Value("--span", "SIZE", "bytes of the region used (default: all of it)"),
            Settings.Flag("--fill", "write every block once before measuring"),
            Settings.Value("--tls-dir", "DIR", "ca-cert.pem, client-cert.pem and client-key.pem: connect with mutual TLS"),
        };
        bench.SetAction((r, _) => Commands.BenchAsync(Values(r, bench)));
        program.Add(bench, new CommandDoc
        {
            Synopsis =
            [
                "nbd-downstairs bench --target ADDRESS:PORT --pattern randwrite|seqwrite|randread",
                "                     [--io-size SIZE] [--depth N] [--seconds S] [--flush-every N] [--span SIZE]",
                "                     [--tls-dir DIR]",
            ],
            Description = """
                Drives one downstairs with a fixed queue depth and prints one line:
                "pattern=... io=... depth=... ops=... seconds=... iops=... mibps=...". With --tls-dir (ca-cert.pem,
                client-cert.pem, client-key.pem) it connects with mutual TLS, as nbd-server does.
                """,
        });
        return program.Seal();
    }

    /// <summary>The values given on the command line for a command's options, by option name.</summary>
    private static CommandArgs Values(ParseResult result, Command command) => new(name =>
        command.Options.FirstOrDefault(o => o.Name == name) switch
        {
            Option<string[]> value => result.Last(value),
            Option<bool> flag => result.GetValue(flag) ? "true" : null,
            _ => throw new InvalidOperationException($"{command.Name} has no option {name}"),
        });

    /// <summary>
    /// Config file &lt; <c>NBD_DOWNSTAIRS_*</c> environment &lt; command line, bound onto
    /// <see cref="DownstairsOptions"/> and validated; an error names the setting, its source and the rule.
    /// </summary>
    internal static (DownstairsOptions Options, CommandArgs Values, LayeredSettings Settings) Load(ParseResult result,
        System.Collections.IDictionary? environment = null, string? defaultConfigFile = DefaultConfigFile)
    {
        LayeredSettings settings = LayeredSettings.Load(result, Run.All, EnvironmentPrefix, result.Last(Run.Config), defaultConfigFile, environment);
        var values = new CommandArgs(name => Run.All.FirstOrDefault(o => o.Name == name) is { } option ? settings.Get(option)
            : throw new InvalidOperationException($"run has no option {name}"));
        try
        {
            return (Commands.RunOptions(values), values, settings);
        }
        catch (Exception e) when (e is ArgumentException or FormatException or OverflowException)
        {
            throw new ArgumentException(settings.Explain(e.Message), e);
        }
    }

    private static async Task<int> RunAsync(ParseResult result)
    {
        (DownstairsOptions options, CommandArgs values, LayeredSettings settings) = Load(result);
        System.Net.IPEndPoint? metrics;
        try
        {
            metrics = values.String("--metrics") is { } m ? CommandArgs.Endpoint("--metrics", m) : null;
        }
        catch (FormatException e)
        {
            throw new ArgumentException(settings.Explain(e.Message), e);
        }
        // Loaded before anything starts, so a missing or unreadable file is one line and exit 2.
        TlsServerPolicy? tls;
        try
        {
            tls = options.TlsDir is { } tlsDir
                ? new TlsServerPolicy(TlsCredentials.LoadServer(tlsDir), requireClientCertificate: true, options.TlsAllowClients) { CoalesceWrites = true, PreferAes128 = true }
                : null;
        }
        catch (TlsSetupException e)
        {
            throw new ArgumentException(settings.Explain($"--tls-dir: {e.Message}"), e);
        }
        return await DownstairsHost.RunAsync(options, tls, values.Flag("--verbose"), values.String("--log-json"), metrics, settings.ConfigFile).ConfigureAwait(false);
    }
}

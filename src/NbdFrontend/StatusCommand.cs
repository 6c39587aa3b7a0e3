using System.Globalization;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using NbdServer.Common.Text;
using NbdServer.Frontend.Server;
using NbdServer.ReplicaEngine;

namespace NbdServer.Frontend;

/// <summary><c>nbd-server status [--control PATH] [--watch] [--json]</c>: the table an operator watches.</summary>
internal static class StatusCommand
{
    public const string Usage = """
        nbd-server status - show the replicated volume's replicas

        SYNOPSIS
            nbd-server status [--control PATH] [--watch] [--json]

        DESCRIPTION
            Asks a running nbd-server (its control socket) for the state
            of each replica: in service, repairing or faulted; jobs and bytes outstanding; jobs
            completed per second; errors; faults and the last reason; live repair progress.

        OPTIONS
            --control PATH        the server's control socket (default: the first that exists of
                                  $RUNTIME_DIRECTORY/control.sock, /run/nbd-server/control.sock,
                                  $XDG_RUNTIME_DIR/nbd-server/control.sock); it is mode 0600, so
                                  run as root or as the server's user
            --watch               refresh every second until Ctrl-C
            --json                print the server's JSON status (schema: docs/control.md); with
                                  --watch, one compact JSON object per line each second
        """;

    public static async Task<int> RunAsync(IReadOnlyList<string> args)
    {
        string? control = null;
        bool watch = false;
        bool json = false;
        for (int i = 0; i < args.Count; i++)
        {
            switch (args[i])
            {
                case "--control" when i + 1 < args.Count:
                    if (!TryControl(args[++i], out control))
                    {
                        return 2;
                    }
                    break;
                case "--watch":
                    watch = true;
                    break;
                case "--json":
                    json = true;
                    break;
                case "-h" or "--help":
                    Console.WriteLine(Usage);
                    return 0;
                default:
                    Console.Error.WriteLine($"nbd-server status: unknown option '{args[i]}' (see --help).");
                    return 2;
            }
        }
        control ??= DefaultControl();
        using HttpClient http = Client(control);
        using var cancel = new CancellationTokenSource();
        Console.CancelKeyPress += (_, e) => { e.Cancel = true; cancel.Cancel(); };
        do
        {
            string? body;
            try
            {
                body = await http.GetStringAsync(StatusUri, cancel.Token);
            }
            catch (HttpRequestException e) when (e.StatusCode == System.Net.HttpStatusCode.NotFound && !json)
            {
                // A --file or --memory server: no replicated volume, only its QoS to show.
                body = null;
            }
            catch (Exception e) when (e is HttpRequestException or TaskCanceledException)
            {
                if (cancel.IsCancellationRequested)
                {
                    return 0;
                }
                Console.Error.WriteLine(Unreachable("status", control, e));
                return 1;
            }
            if (json)
            {
                Console.WriteLine(watch ? Compact(body!) : body!.TrimEnd());
            }
            else
            {
                string table = body is null ? "" : Format(JsonSerializer.Deserialize<EngineStatus>(body, ControlServer.Json)!);
                string qos = await QosCommand.TryGetAsync(http, cancel.Token) is { } report ? QosCommand.Format(report) : "";
                if (watch)
                {
                    Console.Write("\u001b[H\u001b[2J");
                }
                Console.Write(table + qos);
            }
            if (watch)
            {
                try
                {
                    await Task.Delay(1000, cancel.Token);
                }
                catch (OperationCanceledException)
                {
                    return 0;
                }
            }
        }
        while (watch);
        return 0;
    }

    public const string ScrubUsage = """
        nbd-server scrub - check every block of every replica, repair bad copies

        SYNOPSIS
            nbd-server scrub [--control PATH] [--wait] [--timeout SECONDS]

        DESCRIPTION
            A read checks only the copy it reads; rot in a copy nobody reads stays until a scrub.
            The scrub reads each extent from every replica in service, checks each block against
            that replica's stored hash and rewrites a bad block from a good copy, while guest IO
            goes on. Progress shows in `nbd-server status`.

        OPTIONS
            --control PATH        the server's control socket (default: the first that exists of
                                  $RUNTIME_DIRECTORY/control.sock, /run/nbd-server/control.sock,
                                  $XDG_RUNTIME_DIR/nbd-server/control.sock); it is mode 0600, so
                                  run as root or as the server's user
            --wait                wait for the scrub to finish and print its result
            --timeout SECONDS     give up waiting after this long (default 3600)

        EXIT STATUS
            0 started (or, with --wait, finished), 1 no server or the scrub failed, 2 usage error.
        """;

    /// <summary><c>nbd-server scrub</c>: starts a scrub through the control endpoint, optionally waits for it.</summary>
    public static async Task<int> ScrubAsync(IReadOnlyList<string> args)
    {
        string? control = null;
        bool wait = false;
        double timeoutSeconds = 3600;
        for (int i = 0; i < args.Count; i++)
        {
            switch (args[i])
            {
                case "--control" when i + 1 < args.Count:
                    if (!TryControl(args[++i], out control))
                    {
                        return 2;
                    }
                    break;
                case "--wait":
                    wait = true;
                    break;
                case "--timeout" when i + 1 < args.Count && double.TryParse(args[i + 1], NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out timeoutSeconds):
                    i++;
                    break;
                case "-h" or "--help":
                    Console.WriteLine(ScrubUsage);
                    return 0;
                default:
                    Console.Error.WriteLine($"nbd-server scrub: unknown option '{args[i]}' (see --help).");
                    return 2;
            }
        }
        control ??= DefaultControl();
        using HttpClient http = Client(control);
        var deadline = DateTime.UtcNow.AddSeconds(timeoutSeconds);
        try
        {
            using HttpResponseMessage started = await http.PostAsync(ScrubUri, null);
            started.EnsureSuccessStatusCode();
            while (wait)
            {
                EngineStatus status = JsonSerializer.Deserialize<EngineStatus>(await http.GetStringAsync(StatusUri), ControlServer.Json)!;
                if (status.Scrub is { Running: false } done)
                {
                    Console.WriteLine(FormatScrub(done));
                    return done.Problem is null ? 0 : 1;
                }
                if (DateTime.UtcNow > deadline)
                {
                    Console.Error.WriteLine($"nbd-server scrub: still running after {timeoutSeconds:0} s");
                    return 1;
                }
                await Task.Delay(250);
            }
            Console.WriteLine("scrub started; see `nbd-server status`");
            return 0;
        }
        catch (Exception e) when (e is HttpRequestException or TaskCanceledException)
        {
            Console.Error.WriteLine(Unreachable("scrub", control, e));
            return 1;
        }
    }

    public const string RepairUsage = """
        nbd-server repair - show or change the pace of live repair and reconciliation

        SYNOPSIS
            nbd-server repair [--control PATH] [--rate-limit MIB] [--duty-cycle F]

        DESCRIPTION
            A replica that returns is caught up by copies that share the disks and links with the
            guest's IO. The pace bounds them: a rate limit per repaired replica, and the share of
            the time the repair keeps busy while the guest does IO. A change applies to the running
            repair within one chunk and to every later one; it lasts until the server restarts
            (set --repair-rate-limit / --repair-duty-cycle in the config to keep it). Without an
            option, prints the pace in force and each replica's repair.

        OPTIONS
            --control PATH        the server's control socket (default: the first that exists of
                                  $RUNTIME_DIRECTORY/control.sock, /run/nbd-server/control.sock,
                                  $XDG_RUNTIME_DIR/nbd-server/control.sock); it is mode 0600, so
                                  run as root or as the server's user
            --rate-limit MIB      MiB/s each repaired replica may copy; 0 removes the limit
            --duty-cycle F        share of the time in (0, 1] a repair keeps busy while the guest
                                  does IO; 1 copies flat out

        EXIT STATUS
            0 done, 1 no server or the server refused the value (the reason is printed), 2 usage error.
        """;

    /// <summary><c>nbd-server repair</c>: sets the repair pace through the control endpoint and prints the status.</summary>
    public static async Task<int> RepairAsync(IReadOnlyList<string> args)
    {
        string? control = null;
        var query = new List<string>();
        for (int i = 0; i < args.Count; i++)
        {
            switch (args[i])
            {
                case "--control" when i + 1 < args.Count:
                    if (!TryControl(args[++i], out control))
                    {
                        return 2;
                    }
                    break;
                case "--rate-limit" or "--duty-cycle" when i + 1 < args.Count:
                    if (!double.TryParse(args[i + 1], NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double value))
                    {
                        Console.Error.WriteLine($"nbd-server repair: {args[i]}: '{args[i + 1]}' is not a number.");
                        return 2;
                    }
                    string key = args[i] == "--rate-limit" ? ControlServer.RateLimitKey : ControlServer.DutyCycleKey;
                    query.Add(string.Create(CultureInfo.InvariantCulture, $"{key}={value}"));
                    i++;
                    break;
                case "-h" or "--help":
                    Console.WriteLine(RepairUsage);
                    return 0;
                default:
                    Console.Error.WriteLine($"nbd-server repair: unknown option or missing value '{args[i]}' (see --help).");
                    return 2;
            }
        }
        control ??= DefaultControl();
        using HttpClient http = Client(control);
        try
        {
            string body;
            if (query.Count > 0)
            {
                using HttpResponseMessage answer = await http.PostAsync(new Uri($"http://localhost/repair?{string.Join('&', query)}"), null);
                body = await answer.Content.ReadAsStringAsync();
                if (!answer.IsSuccessStatusCode)
                {
                    Console.Error.WriteLine($"nbd-server repair: refused: {body.Trim()}");
                    return 1;
                }
            }
            else
            {
                body = await http.GetStringAsync(StatusUri);
            }
            Console.Write(Format(JsonSerializer.Deserialize<EngineStatus>(body, ControlServer.Json)!));
            return 0;
        }
        catch (Exception e) when (e is HttpRequestException or TaskCanceledException)
        {
            Console.Error.WriteLine(Unreachable("repair", control, e));
            return 1;
        }
    }

    /// <summary>The <c>--control</c> value of every subcommand: a socket path; an ADDRESS:PORT is refused with why.</summary>
    internal static bool TryControl(string value, out string? control)
    {
        if (ControlServer.RefuseTcp(value, "--control") is { } refusal)
        {
            Console.Error.WriteLine($"nbd-server: {refusal}");
            control = null;
            return false;
        }
        control = value;
        return true;
    }

    /// <summary>One line of JSON Lines: the same document without its indentation.</summary>
    internal static string Compact(string json)
    {
        using JsonDocument document = JsonDocument.Parse(json);
        return JsonSerializer.Serialize(document.RootElement);
    }

    /// <summary>
    /// The one line for a control socket that did not answer: a refused permission says who may
    /// connect (the socket is mode 0600), anything else that no server answers there.
    /// </summary>
    internal static string Unreachable(string command, string control, Exception e)
    {
        for (Exception? inner = e; inner is not null; inner = inner.InnerException)
        {
            if (inner is SocketException { SocketErrorCode: SocketError.AccessDenied })
            {
                return $"nbd-server {command}: permission denied on {control}: the control socket is mode 0600; run as root or as the server's user.";
            }
        }
        return $"nbd-server {command}: no server answers on {control} ({e.Message}).";
    }

    private static readonly Uri StatusUri = new("http://localhost/status");
    private static readonly Uri ScrubUri = new("http://localhost/scrub");

    internal static string DefaultControl() =>
        ControlServer.DefaultPath(create: false) ?? Path.Combine(ControlServer.SystemRuntimeDirectory, ControlServer.SocketName);

    /// <summary>An HTTP client whose every connection goes to the Unix socket at <paramref name="path"/>; it asks for JSON.</summary>
    internal static HttpClient Client(string path) => new(new SocketsHttpHandler
    {
        // One connection, kept between the refreshes of --watch and the polls of scrub --wait.
        MaxConnectionsPerServer = 1,
        ConnectCallback = async (_, cancel) =>
        {
            var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            try
            {
                await socket.ConnectAsync(new UnixDomainSocketEndPoint(path), cancel);
                return new NetworkStream(socket, ownsSocket: true);
            }
            catch
            {
                socket.Dispose();
                throw;
            }
        },
    })
    {
        Timeout = TimeSpan.FromSeconds(5),
        DefaultRequestHeaders = { Accept = { new System.Net.Http.Headers.MediaTypeWithQualityHeaderValue("application/json") } },
    };

    private static string FormatScrub(ScrubStatus s) => string.Create(CultureInfo.InvariantCulture,
        $"scrub {(s.Running ? "running" : s.Problem is null ? "complete" : $"stopped: {s.Problem}")}: {s.ExtentsDone}/{s.ExtentTotal} extents, {s.BlocksChecked} block copies checked, {s.BlocksRepaired} repaired");

    internal static string Format(EngineStatus status)
    {
        var text = new StringBuilder();
        CultureInfo c = CultureInfo.InvariantCulture;
        if (status.Startup is { } startup)
        {
            text.AppendLine(c, $"starting, not serving yet: {startup.Phase}{(startup.ExtentTotal > 0 ? $" {startup.ExtentsDone}/{startup.ExtentTotal} extents, {startup.ExtentsRepaired} copies repaired" : "")}");
        }
        text.AppendLine(c, $"volume: {ByteSize.Format(status.Size)} in {status.ExtentCount} extents, block {status.BlockSize} B, generation {status.Generation}, flush {status.FlushNumber}, {status.InService}/3 replicas in service");
        text.AppendLine(c, $"repair pace: {(status.RepairRateLimit > 0 ? $"{status.RepairRateLimit:0.#} MiB/s per replica" : "no rate limit")}, duty cycle {status.RepairDutyCycle:0.##} while the guest does IO");
        text.AppendLine(c, $"{"replica",-8}{"endpoint",-22}{"state",-11}{"jobs",7}{"bytes",12}{"done/s",9}{"done",11}{"errors",8}{"faults",8}  repair / last fault");
        foreach (ReplicaStatus r in status.Replicas)
        {
            string repair = r.State == ReplicaState.Repairing
                ? $"{r.RepairDone}/{r.RepairTotal} extents ({r.RepairMode}), {ByteSize.Format(r.RepairBytesDone)} of ~{ByteSize.Format(r.RepairBytesTotal)}"
                    + (r.RepairBytesPerSecond is { } rate ? $" at {ByteSize.Format((long)rate)}/s, ~{r.RepairSecondsLeft:0} s left" : "")
                : "";
            string fault = r.LastFault is null ? "" : $"last fault: {r.LastFault}";
            text.AppendLine(c, $"{r.Index,-8}{r.EndPoint,-22}{r.State,-11}{r.OutstandingJobs,7}{ByteSize.Format(r.OutstandingBytes),12}{r.CompletedPerSecond,9:0}{r.Completed,11}{r.Errors,8}{r.Faults,8}  {string.Join("  ", new[] { repair, fault }.Where(s => s.Length > 0))}");
        }
        if (status.Scrub is { ExtentTotal: > 0 } scrub)
        {
            text.AppendLine(FormatScrub(scrub));
        }
        return text.ToString();
    }
}

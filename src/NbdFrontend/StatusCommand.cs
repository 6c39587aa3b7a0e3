using System.Globalization;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using NbdServer.Common.Text;
using NbdServer.Frontend.Server;
using NbdServer.ReplicaEngine;

namespace NbdServer.Frontend;

/// <summary><c>nbd-server status</c>, <c>scrub</c> and <c>repair</c>: what they do once parsed (see <see cref="FrontendCommandLine"/>).</summary>
internal static class StatusCommand
{
    /// <summary><c>nbd-server status ARGS</c> (tests): parsed and run as the executable does.</summary>
    public static Task<int> RunAsync(IReadOnlyList<string> args) => FrontendCommandLine.Program.RunAsync(["status", .. args]);

    public static async Task<int> RunAsync(string? control, bool watch, bool json)
    {
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

    /// <summary><c>nbd-server scrub ARGS</c> (tests): parsed and run as the executable does.</summary>
    public static Task<int> ScrubAsync(IReadOnlyList<string> args) => FrontendCommandLine.Program.RunAsync(["scrub", .. args]);

    /// <summary><c>nbd-server scrub</c>: starts a scrub through the control endpoint, optionally waits for it.</summary>
    public static async Task<int> ScrubAsync(string? control, bool wait, double timeoutSeconds)
    {
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

    /// <summary><c>nbd-server repair ARGS</c> (tests): parsed and run as the executable does.</summary>
    public static Task<int> RepairAsync(IReadOnlyList<string> args) => FrontendCommandLine.Program.RunAsync(["repair", .. args]);

    /// <summary><c>nbd-server repair</c>: sets the repair pace through the control endpoint and prints the status.</summary>
    public static async Task<int> RepairAsync(string? control, double? rateLimit, double? dutyCycle)
    {
        var query = new List<string>();
        if (rateLimit is { } rate)
        {
            query.Add(string.Create(CultureInfo.InvariantCulture, $"{ControlServer.RateLimitKey}={rate}"));
        }
        if (dutyCycle is { } duty)
        {
            query.Add(string.Create(CultureInfo.InvariantCulture, $"{ControlServer.DutyCycleKey}={duty}"));
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
    internal static string? Control(string? value) =>
        value is not null && ControlServer.RefuseTcp(value, "--control") is { } refusal ? throw new ArgumentException(refusal) : value;

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

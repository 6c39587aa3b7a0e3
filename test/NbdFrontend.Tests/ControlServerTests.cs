using System.Net.Sockets;
using System.Text.Json;
using System.Text.RegularExpressions;
using NbdServer.Common.Hosting;
using NbdServer.Common.Posix;
using NbdServer.Frontend.Server;
using NbdServer.ReplicaEngine;

namespace NbdServer.Frontend.Tests;

/// <summary>The control endpoint is a Unix socket only the server's user can open; its TCP form is gone.</summary>
[TestFixture]
[CancelAfter(20_000)]
public sealed partial class ControlServerTests
{
    /// <summary>Every field set, none null, every double a fraction: the schema test sees every property and tells numbers from integers.</summary>
    private static readonly EngineStatus FullStatus = new(7, 3, 1L << 30, 4096, 1024, 2,
        [
            new ReplicaStatus(0, "127.0.0.1:10820", ReplicaState.Repairing, 4, 16384, 1000, 250.5, 1, 2, "link reset", 3, 10)
            {
                RepairBytesDone = 1 << 20,
                RepairBytesTotal = 4 << 20,
                RepairBytesPerSecond = 1048576.5,
                RepairSecondsLeft = 3.1,
                RepairMode = "changed-blocks",
                ChangeRecordBytes = 8 << 20,
                RepairBytesCopied = 5 << 20,
                RepairSeconds = 4.5,
            },
        ])
    {
        RepairRateLimit = 12.5,
        RepairDutyCycle = 0.5,
        Scrub = new ScrubStatus(true, 5, 1024, 40960, 1, "stopped"),
        Startup = new StartupStatus("reconciling", 10, 1024, 2),
    };

    private static readonly EngineStatus Status = new(7, 3, 1L << 30, 4096, 1024, 3, []);

    private string _dir = null!;
    private int _scrubs;
    private readonly List<(double? RateLimit, double? DutyCycle)> _paces = [];

    [SetUp]
    public void SetUp()
    {
        _dir = Directory.CreateTempSubdirectory("nbd-control-").FullName;
        _scrubs = 0;
        _paces.Clear();
    }

    [TearDown]
    public void TearDown() => Directory.Delete(_dir, recursive: true);

    private string SocketPath => Path.Combine(_dir, "control.sock");

    private ControlServer Start()
    {
        var control = new ControlServer(SocketPath, () => Status, () => Interlocked.Increment(ref _scrubs), SetPace);
        control.Start();
        return control;
    }

    [Test]
    public async Task Control_socket_is_mode_0600_and_owned_by_the_server_user()
    {
        await using ControlServer control = Start();

        PosixFileStatus socket = UnixSocketFile.Stat(SocketPath)!.Value;
        Assert.That((socket.IsSocket, socket.Mode, socket.Uid, socket.Gid),
            Is.EqualTo((true, UnixFileMode.UserRead | UnixFileMode.UserWrite, UnixSocketFile.Stat(_dir)!.Value.Uid, UnixSocketFile.Stat(_dir)!.Value.Gid)));
    }

    [Test]
    public async Task Another_local_user_cannot_connect_to_the_control_socket()
    {
        if (!OperatingSystem.IsLinux() || Environment.UserName != "root")
        {
            Assert.Ignore("needs root on Linux to act as another user");
            return;
        }
        Assume.That(File.Exists("/usr/bin/setpriv") && File.Exists("/usr/bin/curl"), Is.True, "needs setpriv and curl");
        // The directory is open to everyone, so only the socket's own mode stands in the way.
        File.SetUnixFileMode(_dir, (UnixFileMode)0b111_101_101);
        await using ControlServer control = Start();

        (int nobody, string nobodyError) = await RunAsync("/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "/usr/bin/curl", "-sS", "-X", "POST", "--unix-socket", SocketPath, "http://localhost/scrub");
        (int owner, _) = await RunAsync("/usr/bin/curl", "-sS", "--unix-socket", SocketPath, "http://localhost/status");

        Assert.That(nobody, Is.Not.Zero, "user nobody reached the control socket");
        Assert.That(nobodyError, Does.Contain("ermission denied").Or.Contain("Couldn't connect"));
        Assert.That(owner, Is.Zero, "the owner must still get in");
        Assert.That(_scrubs, Is.Zero);
    }

    [Test]
    public async Task The_status_command_run_by_another_user_is_refused_and_says_who_may_connect()
    {
        if (!OperatingSystem.IsLinux() || Environment.UserName != "root")
        {
            Assert.Ignore("needs root on Linux to act as another user");
            return;
        }
        File.SetUnixFileMode(_dir, (UnixFileMode)0b111_101_101);
        await using ControlServer control = Start();
        string client = Path.Combine(TestContext.CurrentContext.TestDirectory, "nbd-server");

        (int code, string error) = await RunAsync("/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            client, "status", "--control", SocketPath);

        Assume.That(error, Does.Not.Contain("ermission denied").Or.Contain("nbd-server status:"), "user nobody could not run the client itself");
        Assert.That(code, Is.EqualTo(1), error);
        Assert.That(error, Does.Contain($"permission denied on {SocketPath}").And.Contain("run as root or as the server's user"));
        Assert.That(StatusCommand.Unreachable("status", SocketPath, new HttpRequestException("refused")), Does.Contain("no server answers"));
    }

    private static async Task<(int ExitCode, string Error)> RunAsync(string program, params string[] args)
    {
        var start = new System.Diagnostics.ProcessStartInfo(program) { RedirectStandardError = true, RedirectStandardOutput = true };
        foreach (string a in args)
        {
            start.ArgumentList.Add(a);
        }
        using var process = System.Diagnostics.Process.Start(start)!;
        Task<string> error = process.StandardError.ReadToEndAsync();
        await process.StandardOutput.ReadToEndAsync();
        await process.WaitForExitAsync();
        return (process.ExitCode, await error);
    }

    [Test]
    public async Task Scrub_POST_over_the_socket_starts_a_scrub_and_answers_the_status()
    {
        await using ControlServer control = Start();
        using HttpClient http = StatusCommand.Client(SocketPath);

        using HttpResponseMessage response = await http.PostAsync(new Uri("http://localhost/scrub"), null);
        string body = await response.Content.ReadAsStringAsync();

        Assert.That(response.IsSuccessStatusCode, Is.True, body);
        Assert.That(_scrubs, Is.EqualTo(1));
        Assert.That(body, Does.Contain("\"generation\": 7"));
    }

    [Test]
    public async Task Status_GET_does_not_start_a_scrub_and_a_GET_of_scrub_is_refused()
    {
        await using ControlServer control = Start();
        using HttpClient http = StatusCommand.Client(SocketPath);

        string status = await http.GetStringAsync(new Uri("http://localhost/status"));
        using HttpResponseMessage getScrub = await http.GetAsync(new Uri("http://localhost/scrub"));

        Assert.That(status, Does.Contain("\"flushNumber\": 3"));
        Assert.That((int)getScrub.StatusCode, Is.EqualTo(405));
        Assert.That(_scrubs, Is.Zero);
    }

    [Test]
    public async Task Status_command_reads_the_socket_given_by_control()
    {
        await using ControlServer control = Start();
        var output = new StringWriter();
        TextWriter stdout = Console.Out;
        Console.SetOut(output);
        int code;
        try
        {
            code = await StatusCommand.RunAsync(["--control", SocketPath]);
        }
        finally
        {
            Console.SetOut(stdout);
        }

        Assert.That(code, Is.Zero);
        Assert.That(output.ToString(), Does.Contain("generation 7"));
    }

    [Test]
    public async Task Status_JSON_has_exactly_the_fields_docs_control_md_lists_with_their_types()
    {
        await using var control = new ControlServer(SocketPath, () => FullStatus);
        control.Start();
        using HttpClient http = StatusCommand.Client(SocketPath);

        using HttpResponseMessage response = await http.GetAsync(new Uri("http://localhost/status"));
        using JsonDocument json = JsonDocument.Parse(await response.Content.ReadAsStringAsync());
        var sent = new SortedDictionary<string, string>(StringComparer.Ordinal);
        Fields(json.RootElement, "", sent);
        var documented = new SortedDictionary<string, string>(StringComparer.Ordinal);
        foreach (Match m in SchemaRow().Matches(await File.ReadAllTextAsync(Path.Combine(RepositoryRoot(), "docs", "control.md"))))
        {
            documented[m.Groups[1].Value] = m.Groups[2].Value.Replace(" or null", "", StringComparison.Ordinal);
        }

        Assert.That(response.Content.Headers.ContentType?.MediaType, Is.EqualTo("application/json"));
        Assert.That(sent, Is.EqualTo(documented), string.Join(", ", sent.Except(documented).Concat(documented.Except(sent))));
        Assert.That(json.RootElement.GetProperty("replicas")[0].GetProperty("state").GetString(), Is.EqualTo("Repairing"));
        Assert.That(json.RootElement.GetProperty("startup").GetProperty("phase").GetString(), Is.EqualTo("reconciling"));
    }

    /// <summary>Each property's path (<c>replicas[].state</c>) and JSON type, as the docs' table names them.</summary>
    private static void Fields(JsonElement element, string prefix, SortedDictionary<string, string> into)
    {
        foreach (JsonProperty p in element.EnumerateObject())
        {
            string path = prefix + p.Name;
            into[path] = p.Value.ValueKind switch
            {
                JsonValueKind.Object => "object",
                JsonValueKind.Array => "array",
                JsonValueKind.String => "string",
                JsonValueKind.True or JsonValueKind.False => "boolean",
                JsonValueKind.Number => p.Value.TryGetInt64(out _) && !p.Value.GetRawText().Contains('.', StringComparison.Ordinal) ? "integer" : "number",
                _ => "null",
            };
            if (p.Value.ValueKind == JsonValueKind.Object)
            {
                Fields(p.Value, path + ".", into);
            }
            else if (p.Value.ValueKind == JsonValueKind.Array && p.Value.GetArrayLength() > 0)
            {
                Fields(p.Value[0], path + "[].", into);
            }
        }
    }

    private static string RepositoryRoot()
    {
        for (var dir = new DirectoryInfo(TestContext.CurrentContext.TestDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "nbd-server.sln")))
            {
                return dir.FullName;
            }
        }
        throw new DirectoryNotFoundException("no nbd-server.sln above the test directory");
    }

    [GeneratedRegex(@"(?m)^\| `([a-zA-Z.\[\]]+)` \| ([a-z ]+) \|")]
    private static partial Regex SchemaRow();

    [TestCase("?format=text", null)]
    [TestCase("", "text/plain")]
    public async Task Status_as_text_is_the_table_of_the_status_command(string query, string? accept)
    {
        await using var control = new ControlServer(SocketPath, () => FullStatus);
        control.Start();
        using HttpClient http = StatusCommand.Client(SocketPath);
        using var request = new HttpRequestMessage(HttpMethod.Get, new Uri($"http://localhost/status{query}"));
        if (accept is not null)
        {
            request.Headers.Accept.Clear();
            request.Headers.Accept.ParseAdd(accept);
        }

        using HttpResponseMessage response = await http.SendAsync(request);

        Assert.That(response.Content.Headers.ContentType?.MediaType, Is.EqualTo("text/plain"));
        Assert.That(await response.Content.ReadAsStringAsync(), Is.EqualTo(StatusCommand.Format(FullStatus)));
    }

    [Test]
    public async Task Unknown_routes_404_and_wrong_methods_405_with_the_routes_and_start_nothing()
    {
        await using ControlServer control = Start();
        using HttpClient http = StatusCommand.Client(SocketPath);

        using HttpResponseMessage unknown = await http.GetAsync(new Uri("http://localhost/shutdown"));
        using HttpResponseMessage deleteStatus = await http.DeleteAsync(new Uri("http://localhost/status"));
        using HttpResponseMessage putScrub = await http.PutAsync(new Uri("http://localhost/scrub"), null);

        Assert.That(((int)unknown.StatusCode, (int)deleteStatus.StatusCode, (int)putScrub.StatusCode), Is.EqualTo((404, 405, 405)));
        Assert.That(await unknown.Content.ReadAsStringAsync(), Does.Contain("POST /scrub"));
        Assert.That(await deleteStatus.Content.ReadAsStringAsync(), Does.Contain("GET /status"));
        Assert.That(_scrubs, Is.Zero);
    }

    [Test]
    public async Task A_scrub_POST_with_an_oversized_body_is_refused_with_413_starts_nothing_and_the_server_answers_on()
    {
        await using ControlServer control = Start();
        using HttpClient http = StatusCommand.Client(SocketPath);

        using HttpResponseMessage big = await http.PostAsync(new Uri("http://localhost/scrub"), new ByteArrayContent(new byte[LocalHttpLimits.MaxRequestBodyBytes + 1]));
        using HttpClient again = StatusCommand.Client(SocketPath);
        string status = await again.GetStringAsync(new Uri("http://localhost/status"));

        Assert.That((int)big.StatusCode, Is.EqualTo(413));
        Assert.That(_scrubs, Is.Zero);
        Assert.That(status, Does.Contain("\"generation\": 7"));
    }

    [Test]
    public async Task Status_command_with_json_prints_the_servers_JSON()
    {
        await using var control = new ControlServer(SocketPath, () => FullStatus);
        control.Start();
        var output = new StringWriter();
        TextWriter stdout = Console.Out;
        Console.SetOut(output);
        int code;
        try
        {
            code = await StatusCommand.RunAsync(["--control", SocketPath, "--json"]);
        }
        finally
        {
            Console.SetOut(stdout);
        }
        EngineStatus printed = JsonSerializer.Deserialize<EngineStatus>(output.ToString(), ControlServer.Json)!;

        Assert.That(code, Is.Zero);
        Assert.That((printed.Generation, printed.Replicas.Single().RepairMode, printed.Scrub, printed.Startup), Is.EqualTo((7UL, "changed-blocks", FullStatus.Scrub, FullStatus.Startup)));
    }

    [Test]
    public void Watch_json_lines_are_the_document_on_one_line()
    {
        string indented = JsonSerializer.Serialize(FullStatus, ControlServer.Json);

        string line = StatusCommand.Compact(indented);

        Assert.That(line, Does.Not.Contain('\n'));
        Assert.That(JsonSerializer.Deserialize<EngineStatus>(line, ControlServer.Json)!.Scrub, Is.EqualTo(FullStatus.Scrub));
    }

    /// <summary>Stands in for the engine's pace: records what it is given, refuses a duty cycle over 1 as it does.</summary>
    private string? SetPace(double? rateLimit, double? dutyCycle)
    {
        if (dutyCycle > 1)
        {
            return $"duty cycle must be in (0, 1]; got {dutyCycle}";
        }
        lock (_paces)
        {
            _paces.Add((rateLimit, dutyCycle));
        }
        return null;
    }

    [TestCase("rate-limit=25&duty-cycle=0.5", 25.0, 0.5)]
    [TestCase("rate-limit=0", 0.0, null)]
    [TestCase("duty-cycle=1", null, 1.0)]
    public async Task Repair_POST_sets_the_pace_it_names_and_answers_the_status(string query, double? rateLimit, double? dutyCycle)
    {
        await using ControlServer control = Start();
        using HttpClient http = StatusCommand.Client(SocketPath);

        using HttpResponseMessage response = await http.PostAsync(new Uri($"http://localhost/repair?{query}"), null);
        string body = await response.Content.ReadAsStringAsync();

        Assert.That(response.IsSuccessStatusCode, Is.True, body);
        Assert.That(body, Does.Contain("\"generation\": 7"));
        Assert.That(_paces, Is.EqualTo(new[] { (rateLimit, dutyCycle) }));
    }

    [TestCase("", "nothing to set")]
    [TestCase("rate-limit=fast", "not a number")]
    [TestCase("rate-limit=-5", "not a number")]
    [TestCase("speed=5", "'speed' is not a pace setting")]
    [TestCase("rate-limit=1&rate-limit=2", "given twice")]
    [TestCase("duty-cycle=2", "duty cycle must be in (0, 1]")]
    public async Task Repair_POST_with_a_bad_query_is_refused_with_400_and_the_reason_and_changes_nothing(string query, string reason)
    {
        await using ControlServer control = Start();
        using HttpClient http = StatusCommand.Client(SocketPath);

        using HttpResponseMessage response = await http.PostAsync(new Uri($"http://localhost/repair?{query}"), null);
        string body = await response.Content.ReadAsStringAsync();

        Assert.That((int)response.StatusCode, Is.EqualTo(400), body);
        Assert.That(body, Does.Contain(reason));
        Assert.That(_paces, Is.Empty);
    }

    [Test]
    public async Task A_GET_of_repair_is_refused_and_sets_nothing()
    {
        await using ControlServer control = Start();
        using HttpClient http = StatusCommand.Client(SocketPath);

        using HttpResponseMessage response = await http.GetAsync(new Uri("http://localhost/repair?rate-limit=5"));

        Assert.That((int)response.StatusCode, Is.EqualTo(405));
        Assert.That(_paces, Is.Empty);
    }

    [Test]
    public async Task Repair_command_sends_the_pace_prints_the_status_and_exits_1_when_refused_2_on_bad_usage()
    {
        await using ControlServer control = Start();
        TextWriter stdout = Console.Out, stderr = Console.Error;
        var output = new StringWriter();
        var errors = new StringWriter();
        Console.SetOut(output);
        Console.SetError(errors);
        int set, refused, usage, missing;
        try
        {
            set = await StatusCommand.RepairAsync(["--control", SocketPath, "--rate-limit", "12.5", "--duty-cycle", "0.3"]);
            refused = await StatusCommand.RepairAsync(["--control", SocketPath, "--duty-cycle", "3"]);
            usage = await StatusCommand.RepairAsync(["--control", SocketPath, "--rate-limit", "lots"]);
            missing = await StatusCommand.RepairAsync(["--control", SocketPath, "--duty-cycle"]);
        }
        finally
        {
            Console.SetOut(stdout);
            Console.SetError(stderr);
        }

        Assert.That((set, refused, usage, missing), Is.EqualTo((0, 1, 2, 2)));
        Assert.That(_paces, Is.EqualTo(new[] { ((double?)12.5, (double?)0.3) }));
        Assert.That(output.ToString(), Does.Contain("generation 7").And.Contain("repair pace:"));
        Assert.That(errors.ToString(), Does.Contain("refused: duty cycle must be in (0, 1]").And.Contain("'lots' is not a number"));
    }

    [Test]
    public async Task Socket_file_is_removed_when_the_server_stops()
    {
        ControlServer control = Start();
        await control.DisposeAsync();

        Assert.That(File.Exists(SocketPath), Is.False);
    }

    [TestCase("127.0.0.1:10810")]
    [TestCase("[::1]:10810")]
    [TestCase("0.0.0.0:10810")]
    public void A_TCP_control_address_is_refused_at_start(string address) =>
        Assert.That(() => ServeCommand.Parse(["--control", address]),
            Throws.ArgumentException.With.Message.Contains("--control").And.Message.Contains("Unix socket"));

    [Test]
    public async Task Status_and_scrub_commands_refuse_a_TCP_control_address()
    {
        TextWriter stderr = Console.Error;
        Console.SetError(new StringWriter());
        try
        {
            Assert.That(await StatusCommand.RunAsync(["--control", "127.0.0.1:10810"]), Is.EqualTo(2));
            Assert.That(await StatusCommand.ScrubAsync(["--control", "127.0.0.1:10810"]), Is.EqualTo(2));
            Assert.That(await StatusCommand.RepairAsync(["--control", "127.0.0.1:10810"]), Is.EqualTo(2));
        }
        finally
        {
            Console.SetError(stderr);
        }
    }

    [Test]
    public void A_socket_path_is_accepted() =>
        Assert.That(ServeCommand.Parse(["--control", "/run/nbd-server/control.sock"]).Control, Is.EqualTo("/run/nbd-server/control.sock"));

    [Test]
    public async Task Requests_over_the_cap_do_not_wait_behind_silent_clients()
    {
        var limits = new NbdServer.Common.Hosting.LocalHttpLimits { MaxConnections = 1, Timeout = TimeSpan.FromMilliseconds(500) };
        await using var control = new ControlServer(SocketPath, () => Status, limits: limits);
        control.Start();
        using var silent = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await silent.ConnectAsync(new UnixDomainSocketEndPoint(SocketPath));
        var clock = System.Diagnostics.Stopwatch.StartNew();
        string? status = null;
        while (status is null && clock.Elapsed < TimeSpan.FromSeconds(4))
        {
            try
            {
                using HttpClient http = StatusCommand.Client(SocketPath);
                status = await http.GetStringAsync(new Uri("http://localhost/status"));
            }
            catch (HttpRequestException)
            {
                // Over the cap while the silent client holds the only slot: closed at once; try again.
                await Task.Delay(100);
            }
        }

        // Kestrel looks at its deadlines once a second: 500 ms of timeout is up to 1.5 s.
        Assert.That(status, Does.Contain("\"generation\": 7"));
        Assert.That(clock.Elapsed, Is.LessThan(TimeSpan.FromSeconds(3)));
        Assert.That(await silent.ReceiveAsync(new byte[16], SocketFlags.None), Is.Zero, "the silent client was not closed at the deadline");
    }
}

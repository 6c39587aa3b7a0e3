using System.Globalization;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;
using NbdServer.Common.Hosting;
using NbdServer.Common.Logging;
using NbdServer.Frontend.Qos;
using NbdServer.ReplicaEngine;

namespace NbdServer.Frontend.Server;

/// <summary>Applies a repair pace change (null: that part unchanged); answers null, or why it was refused.</summary>
internal delegate string? RepairPaceSetter(double? rateLimit, double? dutyCycle);

/// <summary>
/// The control endpoint, a Unix socket (mode 0600: only the server's user and root may connect),
/// served by Kestrel (<see cref="LocalHttpEndpoint"/>):
/// <c>GET /status</c> answers the engine status as JSON (the schema is in docs/control.md), or as
/// the text table of <c>nbd-server status</c> with <c>?format=text</c> or <c>Accept: text/plain</c>;
/// <c>POST /scrub</c> starts a scrub and answers the status; <c>POST /repair?rate-limit=MIB&amp;duty-cycle=F</c>
/// sets the repair pace and answers the status; <c>GET /qos</c> and <c>POST /qos?read-iops=N&amp;...</c>
/// show and change the exports' QoS limits (<c>nbd-server status</c> / <c>scrub</c> / <c>repair</c> / <c>qos</c>,
/// or <c>curl --unix-socket /run/nbd-server/control.sock http://localhost/status</c>).
/// There is no TCP form: it can change state, and a TCP port on loopback is open to every local user.
/// A server without a replicated volume has no engine status (null): its socket serves QoS only.
/// </summary>
internal sealed class ControlServer : IAsyncDisposable
{
    /// <summary>The query keys of <c>POST /repair</c>, named as the command line's flags.</summary>
    public const string RateLimitKey = "rate-limit";
    public const string DutyCycleKey = "duty-cycle";

    /// <summary><c>GET /status?format=text</c>: the human table instead of JSON.</summary>
    public const string FormatKey = "format";

    private const string EngineRoutes = "GET /status[?format=text], POST /scrub, POST /repair?rate-limit=MIB&duty-cycle=F";
    private const string QosRoutes = "GET /qos, POST /qos?read-iops=N&...";

    public const string SocketName = "control.sock";

    /// <summary>The socket's directory when systemd runs the service: <c>RuntimeDirectory=nbd-server</c>.</summary>
    public const string SystemRuntimeDirectory = "/run/nbd-server";

    internal static readonly JsonSerializerOptions Json = new(JsonSerializerDefaults.Web)
    {
        WriteIndented = true,
        Converters = { new JsonStringEnumConverter() },
    };

    private readonly string _path;
    private readonly Func<EngineStatus>? _status;
    private readonly Action? _startScrub;
    private readonly RepairPaceSetter? _setRepairPace;
    private readonly QosControl? _qos;
    private readonly LocalHttpEndpoint _http;

    public ControlServer(
        string path,
        Func<EngineStatus>? status,
        Action? startScrub = null,
        RepairPaceSetter? setRepairPace = null,
        LocalHttpLimits? limits = null,
        LogThrottle? throttle = null,
        QosControl? qos = null)
    {
        _path = path;
        _status = status;
        _startScrub = startScrub;
        _setRepairPace = setRepairPace;
        _qos = qos;
        // A server without a replicated volume has no engine status (null): its socket serves QoS only.
        string routes = (status, qos) switch
        {
            (null, not null) => $"this server has no replicated volume; its control socket serves {QosRoutes}",
            (not null, not null) => $"{EngineRoutes}, {QosRoutes}",
            _ => EngineRoutes,
        };
        _http = new LocalHttpEndpoint(new UnixDomainSocketEndPoint(path), MapRoutes, limits, throttle, notFoundHint: routes);
    }

    public string Path => _path;

    public void Start() => _http.Start();

    public ValueTask DisposeAsync() => _http.DisposeAsync();

    /// <summary>The routes: one line each (an unknown path answers 404, a known one with another method 405, both listing the routes this server maps).</summary>
    private void MapRoutes(IEndpointRouteBuilder app)
    {
        if (_status is not null)
        {
            app.MapGet("/status", context => Status(context.Request).ExecuteAsync(context));
            app.MapGet("/", context => Status(context.Request).ExecuteAsync(context));
            app.MapPost("/scrub", context => StartScrub(context.Request).ExecuteAsync(context));
            app.MapPost("/repair", context => SetPace(LocalHttpRequest.From(context.Request).Query, _setRepairPace, () => Status(context.Request)).ExecuteAsync(context));
        }
        if (_qos is not null)
        {
            app.MapGet("/qos", context => Qos(_qos).ExecuteAsync(context));
            app.MapPost("/qos", context => SetQos(LocalHttpRequest.From(context.Request).Query, _qos).ExecuteAsync(context));
        }
    }

    /// <summary>The status as JSON, or as text when the request asks for it (<c>?format=text</c>, or <c>Accept: text/plain</c> without JSON).</summary>
    private LocalHttpResponse Status(HttpRequest request)
    {
        EngineStatus status = _status!();
        string? format = request.Query[FormatKey];
        bool text = format == "text" || (format is null
            && request.GetTypedHeaders().Accept is { Count: > 0 } accept
            && accept.Any(a => a.MediaType.Equals("text/plain", StringComparison.OrdinalIgnoreCase))
            && !accept.Any(a => a.MediaType.Equals("application/json", StringComparison.OrdinalIgnoreCase)));
        return text
            ? new LocalHttpResponse(StatusCodes.Status200OK, LocalHttpResponse.PlainText, Encoding.UTF8.GetBytes(StatusCommand.Format(status)))
            : new LocalHttpResponse(StatusCodes.Status200OK, "application/json; charset=utf-8", JsonSerializer.SerializeToUtf8Bytes(status, Json));
    }

    private LocalHttpResponse StartScrub(HttpRequest request)
    {
        _startScrub?.Invoke();
        return Status(request);
    }

    /// <summary>
    /// <c>POST /repair?rate-limit=MIB&amp;duty-cycle=F</c>: either or both; a key not given keeps its
    /// value. Anything else in the query, a value that is not a number or one out of range is
    /// refused with 400 and the reason, and nothing changes.
    /// </summary>
    private static LocalHttpResponse SetPace(string query, RepairPaceSetter? setRepairPace, Func<LocalHttpResponse> status)
    {
        if (setRepairPace is null)
        {
            return LocalHttpResponse.NotFound("this server has no repair to pace");
        }
        double? rateLimit = null;
        double? dutyCycle = null;
        foreach (string pair in query.Split('&', StringSplitOptions.RemoveEmptyEntries))
        {
            string[] kv = pair.Split('=', 2);
            string key = Uri.UnescapeDataString(kv[0]);
            string text = kv.Length == 2 ? Uri.UnescapeDataString(kv[1]) : "";
            if (!double.TryParse(text, NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double value))
            {
                return LocalHttpResponse.Text("400 Bad Request", $"{key}: '{text}' is not a number");
            }
            switch (key)
            {
                case RateLimitKey when rateLimit is null:
                    rateLimit = value;
                    break;
                case DutyCycleKey when dutyCycle is null:
                    dutyCycle = value;
                    break;
                default:
                    return LocalHttpResponse.Text("400 Bad Request", $"'{key}' is not a pace setting (or given twice); use {RateLimitKey} and {DutyCycleKey}");
            }
        }
        if (rateLimit is null && dutyCycle is null)
        {
            return LocalHttpResponse.Text("400 Bad Request", $"nothing to set; give {RateLimitKey}=MIB and/or {DutyCycleKey}=F");
        }
        return setRepairPace(rateLimit, dutyCycle) is { } refusal
            ? LocalHttpResponse.Text("400 Bad Request", refusal)
            : status();
    }

    private static LocalHttpResponse Qos(QosControl qos) =>
        new(StatusCodes.Status200OK, "application/json; charset=utf-8", JsonSerializer.SerializeToUtf8Bytes(qos.Report(), Json));

    /// <summary>
    /// <c>POST /qos?export=NAME&amp;read-iops=N&amp;write-mbps=M&amp;burst=S</c>: any of the keys; one not
    /// given keeps its value, 0 removes a limit. As with <c>/repair</c>, anything else in the query, a
    /// key given twice, a value that is not a number or one out of range is refused with 400 and the
    /// reason, and nothing changes. Answers every export's QoS.
    /// </summary>
    private static LocalHttpResponse SetQos(string query, QosControl qos) =>
        qos.Set(query) is { } refusal ? LocalHttpResponse.BadRequest(refusal) : Qos(qos);

    /// <summary>
    /// Where the control socket lives when <c>--control</c> isn't given, for the server and for
    /// <c>nbd-server status</c> alike: <c>$RUNTIME_DIRECTORY/control.sock</c> under systemd;
    /// else <c>/run/nbd-server/control.sock</c> if that directory exists or can be made (root);
    /// else <c>$XDG_RUNTIME_DIR/nbd-server/control.sock</c> (a user's private runtime directory).
    /// Null when none applies: the operator must say <c>--control PATH</c>.
    /// </summary>
    public static string? DefaultPath(bool create)
    {
        if (Environment.GetEnvironmentVariable("RUNTIME_DIRECTORY") is { Length: > 0 } runtime)
        {
            // systemd may list several directories separated by ':'; ours is the first.
            return System.IO.Path.Combine(runtime.Split(':')[0], SocketName);
        }
        if (Usable(SystemRuntimeDirectory, create))
        {
            return System.IO.Path.Combine(SystemRuntimeDirectory, SocketName);
        }
        if (Environment.GetEnvironmentVariable("XDG_RUNTIME_DIR") is { Length: > 0 } xdg && Usable(System.IO.Path.Combine(xdg, "nbd-server"), create))
        {
            return System.IO.Path.Combine(xdg, "nbd-server", SocketName);
        }
        return null;
    }

    private static bool Usable(string directory, bool create)
    {
        if (!create || OperatingSystem.IsWindows())
        {
            return File.Exists(System.IO.Path.Combine(directory, SocketName));
        }
        try
        {
            // 0755: the directory is only a place to look; the socket's own mode decides who may connect.
            Directory.CreateDirectory(directory, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute
                | UnixFileMode.GroupRead | UnixFileMode.GroupExecute | UnixFileMode.OtherRead | UnixFileMode.OtherExecute);
            string probe = System.IO.Path.Combine(directory, $".probe-{Environment.ProcessId}");
            File.WriteAllBytes(probe, []);
            File.Delete(probe);
            return true;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return false;
        }
    }

    /// <summary>The refusal of an <c>ADDR:PORT</c> where a socket path belongs (the endpoint was TCP before).</summary>
    public static string? RefuseTcp(string value, string setting) =>
        !value.Contains('/', StringComparison.Ordinal) && value.Contains(':', StringComparison.Ordinal)
            ? $"{setting}: '{value}' looks like ADDRESS:PORT; the control endpoint is a Unix socket PATH now (e.g. {SystemRuntimeDirectory}/{SocketName}), because a TCP port would let any local user start a scrub."
            : null;
}

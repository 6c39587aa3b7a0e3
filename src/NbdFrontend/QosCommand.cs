using System.Globalization;
using System.Net;
using System.Text;
using System.Text.Json;
using NbdServer.Frontend.Qos;
using NbdServer.Frontend.Server;

namespace NbdServer.Frontend;

/// <summary><c>nbd-server qos</c> shows, <c>nbd-server qos set ...</c> changes the exports' QoS limits through the control socket.</summary>
internal static class QosCommand
{
    public const string Usage = """
        nbd-server qos - show or change the QoS limits of a running server's exports

        SYNOPSIS
            nbd-server qos [--control PATH] [--json]
            nbd-server qos set [--control PATH] [--export NAME] [--read-iops N] [--write-iops N]
                               [--total-iops N] [--read-mbps MIB] [--write-mbps MIB]
                               [--total-mbps MIB] [--burst SECONDS]

        DESCRIPTION
            Each export has limits on read, write and total operations and MiB per second, each a
            token bucket that holds --burst seconds of its limit. A request over a limit waits (the
            server stops reading that client, so it slows down); it never fails. All connections to
            an export share its buckets. Without `set`, prints each export's limits and how many
            requests waited, and how long. `set` changes only the limits it names (0 removes one),
            at once, also for requests already waiting; the change lasts until the server restarts
            (set the qos-* settings in the config to keep it).

        OPTIONS
            --control PATH        the server's control socket (default: the first that exists of
                                  $RUNTIME_DIRECTORY/control.sock, /run/nbd-server/control.sock,
                                  $XDG_RUNTIME_DIR/nbd-server/control.sock); it is mode 0600, so
                                  run as root or as the server's user. A --file or --memory server
                                  has one only when it was started with --control
            --json                print the raw JSON
            --export NAME         the export to change (default: the first)
            --read-iops N         read operations per second
            --write-iops N        write operations per second (WRITE, TRIM, WRITE_ZEROES)
            --total-iops N        read and write operations together per second
            --read-mbps MIB       MiB/s read
            --write-mbps MIB      MiB/s written
            --total-mbps MIB      MiB/s read and written together
            --burst SECONDS       seconds of each limit an idle client may spend at once

        EXIT STATUS
            0 done, 1 no server or the server refused the value (the reason is printed), 2 usage error.
        """;

    private static readonly Uri QosUri = new("http://localhost/qos");

    /// <summary>Parses the arguments of <c>nbd-server qos [set]</c> and runs <see cref="ShowAsync"/> or <see cref="SetAsync"/>.</summary>
    public static async Task<int> RunAsync(IReadOnlyList<string> args)
    {
        bool set = args.Count > 0 && args[0] == "set";
        string? control = null;
        string? export = null;
        bool json = false;
        var limits = new List<(string Key, double Value)>();
        for (int i = set ? 1 : 0; i < args.Count; i++)
        {
            string arg = args[i];
            switch (arg)
            {
                case "--control" when i + 1 < args.Count:
                    if (!StatusCommand.TryControl(args[++i], out control))
                    {
                        return 2;
                    }
                    break;
                case "--json" when !set:
                    json = true;
                    break;
                case "--export" when set && i + 1 < args.Count:
                    export = args[++i];
                    break;
                case "-h" or "--help":
                    Console.WriteLine(Usage);
                    return 0;
                default:
                    string key = arg.StartsWith("--", StringComparison.Ordinal) ? arg[2..] : "";
                    if (!set || !QosLimits.Keys.Contains(key) || i + 1 >= args.Count)
                    {
                        Console.Error.WriteLine($"nbd-server qos{(set ? " set" : "")}: unknown option or missing value '{arg}' (see --help).");
                        return 2;
                    }
                    if (!double.TryParse(args[i + 1], NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double value) || !double.IsFinite(value))
                    {
                        Console.Error.WriteLine($"nbd-server qos set: {arg}: '{args[i + 1]}' is not a number (0 or more).");
                        return 2;
                    }
                    limits.Add((key, value));
                    i++;
                    break;
            }
        }
        if (set && limits.Count == 0)
        {
            Console.Error.WriteLine("nbd-server qos set: nothing to set; give one or more limits (see --help).");
            return 2;
        }
        return set ? await SetAsync(control, export, limits) : await ShowAsync(control, json);
    }

    /// <summary>Prints every export's QoS (the raw JSON with <paramref name="json"/>); 0, or 1 when no server answers.</summary>
    public static Task<int> ShowAsync(string? control, bool json) => SendAsync(control, null, json);

    /// <summary>
    /// Sends a change (keys of <see cref="QosLimits.Keys"/>, the burst in seconds) for
    /// <paramref name="export"/> (null: the first) and prints the QoS that results; 0, or 1 when
    /// no server answers or it refused the change (the reason is printed).
    /// </summary>
    public static Task<int> SetAsync(string? control, string? export, IReadOnlyList<(string Key, double Value)> limits)
    {
        IEnumerable<string> pairs = limits.Select(l => string.Create(CultureInfo.InvariantCulture, $"{l.Key}={l.Value:R}"));
        if (export is not null)
        {
            pairs = pairs.Prepend($"{QosControl.ExportKey}={Uri.EscapeDataString(export)}");
        }
        return SendAsync(control, new Uri($"http://localhost/qos?{string.Join('&', pairs)}"), json: false);
    }

    /// <summary>GET /qos (<paramref name="post"/> null) or the POST given; prints the answer.</summary>
    private static async Task<int> SendAsync(string? control, Uri? post, bool json)
    {
        control ??= StatusCommand.DefaultControl();
        using HttpClient http = StatusCommand.Client(control);
        try
        {
            using HttpResponseMessage answer = post is null ? await http.GetAsync(QosUri) : await http.PostAsync(post, null);
            string body = await answer.Content.ReadAsStringAsync();
            if (!answer.IsSuccessStatusCode)
            {
                Console.Error.WriteLine($"nbd-server qos: {(answer.StatusCode == HttpStatusCode.BadRequest ? "refused" : "failed")}: {body.Trim()}");
                return 1;
            }
            Console.Write(json ? body + "\n" : Format(JsonSerializer.Deserialize<QosReport>(body, ControlServer.Json)!));
            return 0;
        }
        catch (Exception e) when (e is HttpRequestException or TaskCanceledException)
        {
            Console.Error.WriteLine($"nbd-server qos: no server answers on {control} ({e.Message}).");
            return 1;
        }
    }

    /// <summary>The exports' QoS, or null when the server has none to show (an older server, or no answer).</summary>
    internal static async Task<QosReport?> TryGetAsync(HttpClient http, CancellationToken cancellationToken)
    {
        try
        {
            using HttpResponseMessage answer = await http.GetAsync(QosUri, cancellationToken);
            return answer.IsSuccessStatusCode
                ? JsonSerializer.Deserialize<QosReport>(await answer.Content.ReadAsStringAsync(cancellationToken), ControlServer.Json)
                : null;
        }
        catch (Exception e) when (e is HttpRequestException or TaskCanceledException or JsonException)
        {
            return null;
        }
    }

    /// <summary>One line per export: "qos vol0: read 500 IOPS, burst 1 s; 1234 requests waited 12.3 s in all, 2 waiting now".</summary>
    internal static string Format(QosReport report)
    {
        var text = new StringBuilder();
        foreach (QosStatus e in report.Exports)
        {
            text.AppendLine(CultureInfo.InvariantCulture,
                $"qos {e.Export}: {e.Limits}; {e.ThrottledRequests} requests waited {e.ThrottledSeconds:0.###} s in all, {e.Waiting} waiting now");
        }
        return text.ToString();
    }
}

using System.Globalization;
using System.Net;
using System.Text;
using System.Text.Json;
using NbdServer.Frontend.Qos;
using NbdServer.Frontend.Server;

namespace NbdServer.Frontend;

/// <summary><c>nbd-server qos</c> shows, <c>nbd-server qos set ...</c> changes the exports' QoS limits through the control socket (parsed by <see cref="FrontendCommandLine"/>).</summary>
internal static class QosCommand
{
    private static readonly Uri QosUri = new("http://localhost/qos");

    /// <summary><c>nbd-server qos ARGS</c> (tests): parsed and run as the executable does.</summary>
    public static Task<int> RunAsync(IReadOnlyList<string> args) => FrontendCommandLine.Program.RunAsync(["qos", .. args]);

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

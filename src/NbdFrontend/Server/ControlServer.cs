using System.Net;
using System.Text.Json;
using System.Text.Json.Serialization;
using NbdServer.Common.Hosting;
using NbdServer.ReplicaEngine;

namespace NbdServer.Frontend.Server;

/// <summary>
/// The localhost control endpoint: answers any HTTP request with the engine status as JSON, and
/// <c>POST /scrub</c> also starts a scrub (<c>curl http://127.0.0.1:10810/status</c>, or
/// <c>nbd-server status</c> / <c>nbd-server scrub</c>).
/// </summary>
internal sealed class ControlServer(IPEndPoint endPoint, Func<EngineStatus> status, Action? startScrub = null) : IAsyncDisposable
{
    public const int DefaultPort = 10810;

    internal static readonly JsonSerializerOptions Json = new(JsonSerializerDefaults.Web)
    {
        WriteIndented = true,
        Converters = { new JsonStringEnumConverter() },
    };

    private readonly LocalHttpEndpoint _http = new(endPoint, (method, path) =>
    {
        if (method == "POST" && path == "/scrub")
        {
            startScrub?.Invoke();
        }
        return new LocalHttpResponse("200 OK", "application/json", JsonSerializer.SerializeToUtf8Bytes(status(), Json));
    });

    public IPEndPoint LocalEndPoint => _http.LocalEndPoint;

    public void Start() => _http.Start();

    public ValueTask DisposeAsync() => _http.DisposeAsync();
}

using System.Net;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using NbdServer.ReplicaEngine;

namespace NbdServer.Frontend.Server;

/// <summary>
/// The localhost control endpoint: answers any HTTP request with the engine status as JSON, and
/// <c>POST /scrub</c> also starts a scrub
/// (<c>curl http://127.0.0.1:10810/status</c>, or <c>nbd-server status</c>). One request per
/// connection, a small bounded read, a 5 s deadline: it can't be used to pin the server.
/// </summary>
internal sealed class ControlServer(IPEndPoint endPoint, Func<EngineStatus> status, Action? startScrub = null) : IAsyncDisposable
{
    public const int DefaultPort = 10810;

    internal static readonly JsonSerializerOptions Json = new(JsonSerializerDefaults.Web)
    {
        WriteIndented = true,
        Converters = { new JsonStringEnumConverter() },
    };

    private readonly CancellationTokenSource _stopping = new();
    private Socket? _socket;
    private Task? _loop;

    public IPEndPoint LocalEndPoint => (IPEndPoint)_socket!.LocalEndPoint!;

    public void Start()
    {
        _socket = new Socket(endPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        _socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
        _socket.Bind(endPoint);
        _socket.Listen(16);
        _loop = AcceptAsync(_socket);
    }

    private async Task AcceptAsync(Socket listener)
    {
        while (!_stopping.IsCancellationRequested)
        {
            Socket client;
            try
            {
                client = await listener.AcceptAsync(_stopping.Token);
            }
            catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException or SocketException)
            {
                if (_stopping.IsCancellationRequested)
                {
                    return;
                }
                continue;
            }
            _ = AnswerAsync(client);
        }
    }

    private async Task AnswerAsync(Socket client)
    {
        using (client)
        using (var deadline = CancellationTokenSource.CreateLinkedTokenSource(_stopping.Token))
        {
            deadline.CancelAfter(TimeSpan.FromSeconds(5));
            try
            {
                byte[] request = new byte[4096];
                int received = await client.ReceiveAsync(request, SocketFlags.None, deadline.Token);
                // "POST /scrub" starts a scrub (if none runs); every request is answered with the status.
                if (Encoding.ASCII.GetString(request, 0, received).StartsWith("POST /scrub ", StringComparison.Ordinal))
                {
                    startScrub?.Invoke();
                }
                byte[] body = JsonSerializer.SerializeToUtf8Bytes(status(), Json);
                byte[] header = Encoding.ASCII.GetBytes($"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {body.Length}\r\nConnection: close\r\n\r\n");
                await client.SendAsync(new ArraySegment<byte>[] { header, body }, SocketFlags.None);
            }
            catch (Exception e) when (e is OperationCanceledException or SocketException or ObjectDisposedException)
            {
                // A client that went away or never sent a request: nothing to answer.
            }
        }
    }

    public async ValueTask DisposeAsync()
    {
        await _stopping.CancelAsync();
        _socket?.Dispose();
        if (_loop is not null)
        {
            await _loop;
        }
        _stopping.Dispose();
    }
}

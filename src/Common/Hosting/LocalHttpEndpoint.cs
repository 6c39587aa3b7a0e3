using System.Net;
using System.Net.Sockets;
using System.Text;
using NbdServer.Common.Net;

namespace NbdServer.Common.Hosting;

/// <summary>An answer of a <see cref="LocalHttpEndpoint"/>.</summary>
public readonly record struct LocalHttpResponse(string Status, string ContentType, byte[] Body)
{
    public static LocalHttpResponse NotFound(string hint) => new("404 Not Found", "text/plain", Encoding.UTF8.GetBytes(hint + "\n"));
}

/// <summary>
/// The smallest HTTP/1.0 responder that serves the operator's localhost endpoints (status, scrub,
/// Prometheus metrics): one request per connection, the request line read from at most 4 KiB, a
/// 5 s deadline, one gather send for header and body. It can't be used to pin the server: nothing
/// waits on a client that doesn't speak.
/// </summary>
public sealed class LocalHttpEndpoint(IPEndPoint endPoint, Func<string, string, LocalHttpResponse> handle) : IAsyncDisposable
{
    private const int MaxRequestBytes = 4096;
    private static readonly TimeSpan Deadline = TimeSpan.FromSeconds(5);

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
        _loop = AcceptLoop.RunAsync(_socket, client => _ = AnswerAsync(client), _stopping.Token);
    }

    private async Task AnswerAsync(Socket client)
    {
        using (client)
        using (var deadline = CancellationTokenSource.CreateLinkedTokenSource(_stopping.Token))
        {
            deadline.CancelAfter(Deadline);
            try
            {
                byte[] request = new byte[MaxRequestBytes];
                int received = await client.ReceiveAsync(request, SocketFlags.None, deadline.Token);
                string[] line = Encoding.ASCII.GetString(request, 0, received).Split('\n')[0].Trim().Split(' ');
                string method = line[0];
                string path = line.Length > 1 ? line[1].Split('?')[0] : "/";
                LocalHttpResponse response = handle(method, path);
                byte[] header = Encoding.ASCII.GetBytes($"HTTP/1.0 {response.Status}\r\nContent-Type: {response.ContentType}\r\nContent-Length: {response.Body.Length}\r\nConnection: close\r\n\r\n");
                await client.SendAsync(new ArraySegment<byte>[] { header, response.Body }, SocketFlags.None);
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

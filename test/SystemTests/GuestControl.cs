using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text;

namespace NbdServer.SystemTests;

/// <summary>
/// Where the kernel-test guest asks for the faults of its fio suite (scripts/kernel-test/fio-suite.sh,
/// <c>host_event</c>): it connects to <see cref="Port"/> on the host's loopback (10.0.2.2 in the
/// guest), sends one line such as <c>kill 1</c> and waits; the handler does it, and the answer is
/// <c>ok</c> or <c>fail: why</c>. One request at a time, each bounded: the line by
/// <see cref="MaxLineBytes"/> and <see cref="ReadTimeout"/>, the handler by <see cref="HandlerTimeout"/>
/// (shorter than the guest's own wait, so the guest always hears why).
/// </summary>
internal sealed class GuestControl : IAsyncDisposable
{
    /// <summary>The longest request line; the guest's are a few words.</summary>
    public const int MaxLineBytes = 128;

    public static readonly TimeSpan ReadTimeout = TimeSpan.FromSeconds(10);

    /// <summary>Below the guest's HOST_EVENT_LIMIT_S (150 s) in fio-suite.sh.</summary>
    public static readonly TimeSpan HandlerTimeout = TimeSpan.FromSeconds(140);

    private readonly TcpListener _listener;
    private readonly Func<string, CancellationToken, Task> _handler;
    private readonly CancellationTokenSource _stop = new();
    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private readonly List<string> _events = [];
    private readonly Task _loop;

    private GuestControl(Func<string, CancellationToken, Task> handler)
    {
        _handler = handler;
        _listener = new TcpListener(IPAddress.Loopback, 0);
        _listener.Start();
        _loop = Task.Run(ServeAsync);
    }

    public int Port => ((IPEndPoint)_listener.LocalEndpoint).Port;

    /// <summary>Every request with its answer and when it came (seconds since the start).</summary>
    public IReadOnlyList<string> Events
    {
        get
        {
            lock (_events)
            {
                return [.. _events];
            }
        }
    }

    /// <summary>Starts listening; <paramref name="handler"/> does one request (an exception becomes the "fail:" answer).</summary>
    public static GuestControl Start(Func<string, CancellationToken, Task> handler) => new(handler);

    private async Task ServeAsync()
    {
        while (!_stop.IsCancellationRequested)
        {
            TcpClient client;
            try
            {
                client = await _listener.AcceptTcpClientAsync(_stop.Token);
            }
            catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException or SocketException)
            {
                return;
            }
            using (client)
            {
                await ServeOneAsync(client);
            }
        }
    }

    private async Task ServeOneAsync(TcpClient client)
    {
        NetworkStream stream = client.GetStream();
        string? line = await ReadLineAsync(stream);
        if (line is null)
        {
            Record("(no request line)", "dropped");
            return;
        }
        string answer;
        using (var limit = CancellationTokenSource.CreateLinkedTokenSource(_stop.Token))
        {
            limit.CancelAfter(HandlerTimeout);
            try
            {
                await _handler(line, limit.Token).WaitAsync(limit.Token);
                answer = "ok";
            }
            catch (Exception e)
            {
                // One line: the guest prints it on its console as the reason it failed.
                answer = "fail: " + e.Message.ReplaceLineEndings(" ");
                if (answer.Length > 400)
                {
                    answer = answer[..400];
                }
                TestContext.Out.WriteLine($"guest request '{line}' failed: {e}");
            }
        }
        Record(line, answer);
        try
        {
            await stream.WriteAsync(Encoding.ASCII.GetBytes(answer + "\n"));
            client.Client.Shutdown(SocketShutdown.Send);
        }
        catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException)
        {
            // The guest gave up waiting; it fails on its side.
        }
    }

    /// <summary>One line (up to '\n' or the guest's half-close), or null if it is too long, too slow or empty.</summary>
    private async Task<string?> ReadLineAsync(NetworkStream stream)
    {
        byte[] buffer = new byte[MaxLineBytes];
        int length = 0;
        using var limit = CancellationTokenSource.CreateLinkedTokenSource(_stop.Token);
        limit.CancelAfter(ReadTimeout);
        try
        {
            while (length < buffer.Length)
            {
                int read = await stream.ReadAsync(buffer.AsMemory(length), limit.Token);
                if (read == 0)
                {
                    break;
                }
                length += read;
                if (Array.IndexOf(buffer, (byte)'\n', 0, length) >= 0)
                {
                    break;
                }
            }
        }
        catch (Exception e) when (e is OperationCanceledException or IOException or SocketException or ObjectDisposedException)
        {
            return null;
        }
        int end = Array.IndexOf(buffer, (byte)'\n', 0, length);
        if (end < 0 && length == buffer.Length)
        {
            return null;
        }
        string line = Encoding.ASCII.GetString(buffer, 0, end < 0 ? length : end).Trim();
        return line.Length == 0 ? null : line;
    }

    private void Record(string request, string answer)
    {
        lock (_events)
        {
            _events.Add(string.Create(CultureInfo.InvariantCulture, $"{_clock.Elapsed.TotalSeconds,7:0.0} s  {request} -> {answer}"));
        }
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync();
        _listener.Stop();
        try
        {
            await _loop.WaitAsync(TimeSpan.FromSeconds(10));
        }
        catch (TimeoutException)
        {
            // A handler ignored its token; the process exits anyway.
        }
        _listener.Dispose();
        _stop.Dispose();
    }
}

using System.Net.Sockets;

namespace NbdServer.Common.Net;

/// <summary>Accepts connections on a listening socket until stopped; each one goes to a handler.</summary>
public static class AcceptLoop
{
    /// <summary>
    /// Pause after an accept failure that is not one client's reset (EMFILE, ENFILE, ENOBUFS): retrying
    /// at once would spin a CPU on a condition that lasts until some connection closes.
    /// </summary>
    public static readonly TimeSpan RetryDelay = TimeSpan.FromMilliseconds(100);

    /// <summary>
    /// Runs until <paramref name="stopping"/> is cancelled. A failed accept (a client that reset
    /// before we took it, a transient socket error) is skipped, never fatal: the listener keeps serving.
    /// </summary>
    /// <param name="failed">Told of each failed accept other than a client's reset (the caller throttles its log).</param>
    /// <param name="time">Clock for <see cref="RetryDelay"/> (default: the system clock).</param>
    public static async Task RunAsync(Socket listener, Action<Socket> accepted, CancellationToken stopping, Action<Exception>? failed = null, TimeProvider? time = null)
    {
        while (!stopping.IsCancellationRequested)
        {
            Socket client;
            try
            {
                client = await listener.AcceptAsync(stopping).ConfigureAwait(false);
            }
            catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException or SocketException)
            {
                if (stopping.IsCancellationRequested || e is ObjectDisposedException)
                {
                    return; // stopping, or the listener was closed under us: nothing left to accept from
                }
                if (e is SocketException { SocketErrorCode: SocketError.ConnectionReset or SocketError.ConnectionAborted })
                {
                    continue;
                }
                failed?.Invoke(e);
                try
                {
                    await Task.Delay(RetryDelay, time ?? TimeProvider.System, stopping).ConfigureAwait(false);
                }
                catch (OperationCanceledException)
                {
                    return;
                }
                continue;
            }
            accepted(client);
        }
    }
}

using System.Net.Sockets;

namespace NbdServer.Common.Net;

/// <summary>Accepts connections on a listening socket until stopped; each one goes to a handler.</summary>
public static class AcceptLoop
{
    /// <summary>
    /// Runs until <paramref name="stopping"/> is cancelled. A failed accept (a client that reset
    /// before we took it, a transient socket error) is skipped, never fatal: the listener keeps serving.
    /// </summary>
    public static async Task RunAsync(Socket listener, Action<Socket> accepted, CancellationToken stopping)
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
                if (stopping.IsCancellationRequested)
                {
                    return;
                }
                continue;
            }
            accepted(client);
        }
    }
}

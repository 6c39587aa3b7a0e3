using System.Net;
using System.Net.Sockets;
using NbdServer.Common.Net;

namespace NbdServer.Common.Tests;

[CancelAfter(10_000)]
public sealed class AcceptLoopTests
{
    private static Socket Listen()
    {
        var listener = new Socket(SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(16);
        return listener;
    }

    [Test]
    public async Task Each_connection_goes_to_the_handler_and_the_loop_ends_when_stopped()
    {
        using Socket listener = Listen();
        using var stop = new CancellationTokenSource();
        var accepted = new List<Socket>();
        var three = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        Task loop = AcceptLoop.RunAsync(listener, s =>
        {
            lock (accepted)
            {
                accepted.Add(s);
                if (accepted.Count == 3)
                {
                    three.SetResult();
                }
            }
        }, stop.Token);
        var clients = new List<Socket>();
        for (int i = 0; i < 3; i++)
        {
            var c = new Socket(SocketType.Stream, ProtocolType.Tcp);
            await c.ConnectAsync(listener.LocalEndPoint!);
            clients.Add(c);
        }
        await three.Task;
        await stop.CancelAsync();
        await loop;
        Assert.That(accepted, Has.Count.EqualTo(3));
        foreach (Socket s in accepted.Concat(clients))
        {
            s.Dispose();
        }
    }

    [Test]
    public async Task The_loop_ends_when_its_listener_is_closed_under_it()
    {
        Socket listener = Listen();
        Task loop = AcceptLoop.RunAsync(listener, s => s.Dispose(), CancellationToken.None);
        listener.Dispose();
        await loop;
        Assert.That(loop.IsCompletedSuccessfully, Is.True, "a closed listener ends the loop instead of spinning on it");
    }
}

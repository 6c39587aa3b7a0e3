using System.Globalization;
using System.Net;
using System.Text;
using System.Text.Json;
using NbdServer.Common.Text;
using NbdServer.Frontend.Server;
using NbdServer.ReplicaEngine;

namespace NbdServer.Frontend;

/// <summary><c>nbd-server status [--control ADDR:PORT] [--watch] [--json]</c>: the table an operator watches.</summary>
internal static class StatusCommand
{
    public const string Usage = """
        nbd-server status - show the replicated volume's replicas

        SYNOPSIS
            nbd-server status [--control ADDR:PORT] [--watch] [--json]

        DESCRIPTION
            Asks a running nbd-server (its control endpoint, default 127.0.0.1:10810) for the state
            of each replica: in service, repairing or faulted; jobs and bytes outstanding; jobs
            completed per second; errors; faults and the last reason; live repair progress.

        OPTIONS
            --control ADDR:PORT   the server's control endpoint (default 127.0.0.1:10810)
            --watch               refresh every second until Ctrl-C
            --json                print the raw JSON
        """;

    public static async Task<int> RunAsync(IReadOnlyList<string> args)
    {
        IPEndPoint control = new(IPAddress.Loopback, ControlServer.DefaultPort);
        bool watch = false;
        bool json = false;
        for (int i = 0; i < args.Count; i++)
        {
            switch (args[i])
            {
                case "--control" when i + 1 < args.Count:
                    control = ServeCommand.ParseEndPoint(args[++i], "--control");
                    break;
                case "--watch":
                    watch = true;
                    break;
                case "--json":
                    json = true;
                    break;
                case "-h" or "--help":
                    Console.WriteLine(Usage);
                    return 0;
                default:
                    Console.Error.WriteLine($"nbd-server status: unknown option '{args[i]}' (see --help).");
                    return 2;
            }
        }
        using var http = new HttpClient { Timeout = TimeSpan.FromSeconds(5) };
        using var cancel = new CancellationTokenSource();
        Console.CancelKeyPress += (_, e) => { e.Cancel = true; cancel.Cancel(); };
        do
        {
            string body;
            try
            {
                body = await http.GetStringAsync(new Uri($"http://{control}/status"), cancel.Token);
            }
            catch (Exception e) when (e is HttpRequestException or TaskCanceledException)
            {
                if (cancel.IsCancellationRequested)
                {
                    return 0;
                }
                Console.Error.WriteLine($"nbd-server status: no server answers on {control} ({e.Message}).");
                return 1;
            }
            if (json)
            {
                Console.WriteLine(body);
            }
            else
            {
                EngineStatus status = JsonSerializer.Deserialize<EngineStatus>(body, ControlServer.Json)!;
                if (watch)
                {
                    Console.Write("\u001b[H\u001b[2J");
                }
                Console.Write(Format(status));
            }
            if (watch)
            {
                try
                {
                    await Task.Delay(1000, cancel.Token);
                }
                catch (OperationCanceledException)
                {
                    return 0;
                }
            }
        }
        while (watch);
        return 0;
    }

    internal static string Format(EngineStatus status)
    {
        var text = new StringBuilder();
        CultureInfo c = CultureInfo.InvariantCulture;
        text.AppendLine(c, $"volume: {ByteSize.Format(status.Size)} in {status.ExtentCount} extents, block {status.BlockSize} B, generation {status.Generation}, flush {status.FlushNumber}, {status.InService}/3 replicas in service");
        text.AppendLine(c, $"{"replica",-8}{"endpoint",-22}{"state",-11}{"jobs",7}{"bytes",12}{"done/s",9}{"done",11}{"errors",8}{"faults",8}  repair / last fault");
        foreach (ReplicaStatus r in status.Replicas)
        {
            string repair = r.State == ReplicaState.Repairing ? $"{r.RepairDone}/{r.RepairTotal} extents" : "";
            string fault = r.LastFault is null ? "" : $"last fault: {r.LastFault}";
            text.AppendLine(c, $"{r.Index,-8}{r.EndPoint,-22}{r.State,-11}{r.OutstandingJobs,7}{ByteSize.Format(r.OutstandingBytes),12}{r.CompletedPerSecond,9:0}{r.Completed,11}{r.Errors,8}{r.Faults,8}  {string.Join("  ", new[] { repair, fault }.Where(s => s.Length > 0))}");
        }
        return text.ToString();
    }
}

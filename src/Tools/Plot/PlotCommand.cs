using System.CommandLine;
using System.Globalization;
using ScottPlot;

namespace NbdServer.Tools.Plotting;

/// <summary>
/// nbd-plot: the pictures of the incident suite and the benchmarks. The scripts write their
/// per-second figures and their result tables as CSV; this turns them into PNG. It draws, never
/// judges: no threshold or verdict lives here (the scripts' own analysis does that).
/// Exit codes: 0 written, 1 could not render or write the picture, 2 bad usage or bad input.
/// </summary>
internal static class PlotCommand
{
    public const int Ok = 0;
    public const int Failed = 1;
    public const int BadUsage = 2;

    public static int Run(IReadOnlyList<string> args, TextWriter stdout, TextWriter stderr)
    {
        var csv = new Option<string>("--csv") { Description = "The input CSV", Required = true, HelpName = "FILE" };
        var output = new Option<string>("--out") { Description = "The PNG to write (replaced if it exists)", Required = true, HelpName = "FILE" };
        var title = new Option<string>("--title") { Description = "A title line above the chart", DefaultValueFactory = _ => "", HelpName = "TEXT" };
        var width = new Option<int>("--width") { Description = $"Picture width in pixels ({PngWriter.MinWidth}-{PngWriter.MaxWidth})", DefaultValueFactory = _ => 1000 };
        var timelineHeight = new Option<int>("--height") { Description = $"Picture height in pixels ({PngWriter.MinHeight}-{PngWriter.MaxHeight})", DefaultValueFactory = _ => 560 };
        var barsHeight = new Option<int>("--height") { Description = $"Picture height in pixels ({PngWriter.MinHeight}-{PngWriter.MaxHeight})", DefaultValueFactory = _ => 420 };
        var fault = new Option<string[]>("--fault") { Description = "A fault window START,END in the timeline's seconds, shaded red (repeatable)", HelpName = "START,END" };
        var repair = new Option<string[]>("--repair") { Description = "A live repair START,END, shaded green between dashed lines (repeatable)", HelpName = "START,END" };
        var mark = new Option<string[]>("--event") { Description = "A labelled dotted line at SECONDS, e.g. 0.33:replica faulted (repeatable)", HelpName = "SECONDS:LABEL" };
        var xlabel = new Option<string>("--xlabel") { Description = "Label of the time axis", DefaultValueFactory = _ => "seconds from the start of the fault", HelpName = "TEXT" };

        var timeline = new Command("timeline", $"""
            Draw an incident's per-second timeline: completed IOs per second above, the longest IO of
            each second below, fault windows and repairs marked. CSV columns: {CsvInput.TimelineHeader}
            (one row per second; t_s increasing).
            """)
        { csv, output, title, width, timelineHeight, fault, repair, mark, xlabel };
        var bars = new Command("bars", $"""
            Draw a benchmark comparison: one panel per unit, a cluster of bars per workload, a colour
            per server. CSV columns: {CsvInput.BarsHeader} (panels, groups and series in order of first
            appearance; at most {BarChart.MaxPanels} panels).
            """)
        { csv, output, title, width, barsHeight };
        var root = new RootCommand("""
            nbd-plot: draws the incident timelines and the benchmark comparisons of nbd-server as PNG.
            Exit codes: 0 written, 1 could not render or write, 2 bad usage or bad input.
            """)
        { timeline, bars };

        int result = Ok;
        timeline.SetAction(parse =>
        {
            int w = parse.GetValue(width), h = parse.GetValue(timelineHeight);
            if (!TrySize(w, h, stderr)
                || !TrySpans(parse.GetValue(fault), "--fault", out List<TimeSpan2> faults, stderr)
                || !TrySpans(parse.GetValue(repair), "--repair", out List<TimeSpan2> repairs, stderr)
                || !TryEvents(parse.GetValue(mark), out List<TimeEvent> events, stderr))
            {
                return result = BadUsage;
            }
            if (!CsvInput.TryReadTimeline(parse.GetValue(csv)!, out List<TimelinePoint> points, out string? error))
            {
                stderr.WriteLine($"nbd-plot: {error}");
                return result = BadUsage;
            }
            var marks = new TimelineMarks(faults, repairs, events, parse.GetValue(title)!, parse.GetValue(xlabel)!);
            return result = Write(() => TimelineChart.Build(points, marks), marks.Title, w, h, parse.GetValue(output)!, stdout, stderr);
        });
        bars.SetAction(parse =>
        {
            int w = parse.GetValue(width), h = parse.GetValue(barsHeight);
            if (!TrySize(w, h, stderr))
            {
                return result = BadUsage;
            }
            if (!CsvInput.TryReadBars(parse.GetValue(csv)!, out List<BarValue> values, out string? error)
                || !BarChart.TryBuild(values, out Multiplot? chart, out error))
            {
                stderr.WriteLine($"nbd-plot: {error}");
                return result = BadUsage;
            }
            return result = Write(() => chart!, parse.GetValue(title)!, w, h, parse.GetValue(output)!, stdout, stderr);
        });

        ParseResult parsed = root.Parse(args);
        if (parsed.Errors.Count > 0)
        {
            foreach (var e in parsed.Errors)
            {
                stderr.WriteLine($"nbd-plot: {e.Message}");
            }
            stderr.WriteLine("Try 'nbd-plot --help'.");
            return BadUsage;
        }
        int code = parsed.Invoke(new InvocationConfiguration { Output = stdout, Error = stderr, EnableDefaultExceptionHandler = false });
        // The root command alone has no action of its own: its help, then usage's exit code.
        return parsed.CommandResult.Command == root && !args.Contains("--help") && !args.Contains("-h") ? BadUsage : code == Ok ? result : code;
    }

    private static int Write(Func<Multiplot> build, string title, int width, int height, string path, TextWriter stdout, TextWriter stderr)
    {
        byte[] png;
        try
        {
            png = PngWriter.Encode(build(), title, width, height);
        }
        catch (Exception e) when (e is DllNotFoundException or TypeInitializationException or InvalidOperationException or ArgumentException)
        {
            // Most likely the native Skia library could not load; the message says which.
            stderr.WriteLine($"nbd-plot: could not render the chart: {e.GetBaseException().Message}");
            return Failed;
        }
        try
        {
            string tmp = path + ".tmp";
            File.WriteAllBytes(tmp, png);
            File.Move(tmp, path, overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            stderr.WriteLine($"nbd-plot: could not write {path}: {e.Message}");
            return Failed;
        }
        stdout.WriteLine($"nbd-plot: wrote {path} ({width}x{height}, {png.Length} bytes)");
        return Ok;
    }

    private static bool TrySize(int width, int height, TextWriter stderr)
    {
        if (width is < PngWriter.MinWidth or > PngWriter.MaxWidth || height is < PngWriter.MinHeight or > PngWriter.MaxHeight)
        {
            stderr.WriteLine($"nbd-plot: --width must be {PngWriter.MinWidth}-{PngWriter.MaxWidth} and --height {PngWriter.MinHeight}-{PngWriter.MaxHeight}, not {width}x{height}");
            return false;
        }
        return true;
    }

    private static bool TrySpans(string[]? values, string option, out List<TimeSpan2> spans, TextWriter stderr)
    {
        spans = [];
        foreach (string v in values ?? [])
        {
            string[] parts = v.Split(',');
            if (parts.Length != 2 || !TryNumber(parts[0], out double start) || !TryNumber(parts[1], out double end) || end < start)
            {
                stderr.WriteLine($"nbd-plot: {option} takes START,END in seconds with END >= START, not '{v}'");
                return false;
            }
            spans.Add(new TimeSpan2(start, end));
        }
        return true;
    }

    private static bool TryEvents(string[]? values, out List<TimeEvent> events, TextWriter stderr)
    {
        events = [];
        foreach (string v in values ?? [])
        {
            int colon = v.IndexOf(':', StringComparison.Ordinal);
            if (colon <= 0 || !TryNumber(v[..colon], out double at) || v.Length - colon - 1 > CsvInput.MaxLabelLength)
            {
                stderr.WriteLine($"nbd-plot: --event takes SECONDS:LABEL (label at most {CsvInput.MaxLabelLength} characters), not '{v}'");
                return false;
            }
            events.Add(new TimeEvent(at, v[(colon + 1)..]));
        }
        return true;
    }

    private static bool TryNumber(string text, out double value) =>
        double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out value) && double.IsFinite(value);
}

using System.Globalization;

namespace NbdServer.Tools.Plotting;

/// <summary>One second of an incident: where it sits on the time axis and what the guest saw.
/// <paramref name="ProbeIops"/>: a second client's IOs in that second (NaN where it has none).</summary>
internal readonly record struct TimelinePoint(double Seconds, double Iops, double LatencyMs, double Errors, double ProbeIops = double.NaN);

/// <summary>One bar of a comparison chart: its panel (one unit each), its group on the x axis and its series (colour).</summary>
internal readonly record struct BarValue(string Panel, string Group, string Series, double Value);

/// <summary>
/// Reads the two CSV shapes nbd-plot draws. Both have a header line naming their columns (any order,
/// extra columns ignored), comma-separated, numbers in invariant culture, no quoting (the scripts
/// that write them never put a comma in a label). Input comes from our own scripts but is still
/// bounded: a file over <see cref="MaxInputBytes"/> or <see cref="MaxRows"/> is refused, not drawn.
/// Every refusal names the file, the line and the rule.
/// </summary>
internal static class CsvInput
{
    /// <summary>Larger than a day of per-second rows and far below what would make a slow picture.</summary>
    public const int MaxRows = 100_000;

    /// <summary>16 MiB: a day of per-second rows is about 3 MiB.</summary>
    public const long MaxInputBytes = 16L << 20;

    /// <summary>Longest label kept (a panel, group or series name); longer ones do not fit a chart.</summary>
    public const int MaxLabelLength = 80;

    public const string TimelineHeader = "t_s,iops,latency_ms[,errors][,probe_iops]";
    public const string BarsHeader = "panel,group,series,value";

    public static bool TryReadTimeline(string path, out List<TimelinePoint> points, out string? error)
    {
        points = [];
        if (!TryReadLines(path, out List<string> lines, out error))
        {
            return false;
        }
        string[] header = lines[0].Split(',', StringSplitOptions.TrimEntries);
        int t = Array.IndexOf(header, "t_s"), iops = Array.IndexOf(header, "iops"),
            lat = Array.IndexOf(header, "latency_ms"), err = Array.IndexOf(header, "errors"),
            probe = Array.IndexOf(header, "probe_iops");
        if (t < 0 || iops < 0 || lat < 0)
        {
            error = $"{path}:1: the header must name the columns {TimelineHeader}, not '{lines[0]}'";
            return false;
        }
        double last = double.NegativeInfinity;
        for (int i = 1; i < lines.Count; i++)
        {
            if (lines[i].Length == 0)
            {
                continue;
            }
            string[] cells = lines[i].Split(',', StringSplitOptions.TrimEntries);
            if (cells.Length < header.Length)
            {
                error = $"{path}:{i + 1}: {cells.Length} columns, the header has {header.Length}";
                return false;
            }
            if (!TryNumber(cells[t], out double seconds) || !TryNumber(cells[iops], out double io) || io < 0
                || !TryNumber(cells[lat], out double ms) || ms < 0)
            {
                error = $"{path}:{i + 1}: t_s must be a number, iops and latency_ms numbers >= 0: '{lines[i]}'";
                return false;
            }
            double errors = 0;
            if (err >= 0 && (!TryNumber(cells[err], out errors) || errors < 0))
            {
                error = $"{path}:{i + 1}: errors must be a number >= 0: '{lines[i]}'";
                return false;
            }
            // An empty probe cell: that client had no second here (it started later or ended sooner).
            double probeIops = double.NaN;
            if (probe >= 0 && cells[probe].Length > 0 && (!TryNumber(cells[probe], out probeIops) || probeIops < 0))
            {
                error = $"{path}:{i + 1}: probe_iops must be empty or a number >= 0: '{lines[i]}'";
                return false;
            }
            if (seconds <= last)
            {
                error = $"{path}:{i + 1}: t_s must increase from row to row ({seconds.ToString(CultureInfo.InvariantCulture)} after {last.ToString(CultureInfo.InvariantCulture)})";
                return false;
            }
            last = seconds;
            points.Add(new TimelinePoint(seconds, io, ms, errors, probeIops));
        }
        if (points.Count == 0)
        {
            error = $"{path}: no data rows after the header";
            return false;
        }
        return true;
    }

    public static bool TryReadBars(string path, out List<BarValue> bars, out string? error)
    {
        bars = [];
        if (!TryReadLines(path, out List<string> lines, out error))
        {
            return false;
        }
        string[] header = lines[0].Split(',', StringSplitOptions.TrimEntries);
        int panel = Array.IndexOf(header, "panel"), group = Array.IndexOf(header, "group"),
            series = Array.IndexOf(header, "series"), value = Array.IndexOf(header, "value");
        if (panel < 0 || group < 0 || series < 0 || value < 0)
        {
            error = $"{path}:1: the header must name the columns {BarsHeader}, not '{lines[0]}'";
            return false;
        }
        for (int i = 1; i < lines.Count; i++)
        {
            if (lines[i].Length == 0)
            {
                continue;
            }
            string[] cells = lines[i].Split(',', StringSplitOptions.TrimEntries);
            if (cells.Length < header.Length)
            {
                error = $"{path}:{i + 1}: {cells.Length} columns, the header has {header.Length}";
                return false;
            }
            if (!TryNumber(cells[value], out double v) || v < 0)
            {
                error = $"{path}:{i + 1}: value must be a number >= 0: '{lines[i]}'";
                return false;
            }
            if (cells[panel].Length is 0 or > MaxLabelLength || cells[group].Length is 0 or > MaxLabelLength
                || cells[series].Length is 0 or > MaxLabelLength)
            {
                error = $"{path}:{i + 1}: panel, group and series must be 1-{MaxLabelLength} characters: '{lines[i]}'";
                return false;
            }
            bars.Add(new BarValue(cells[panel], cells[group], cells[series], v));
        }
        if (bars.Count == 0)
        {
            error = $"{path}: no data rows after the header";
            return false;
        }
        return true;
    }

    private static bool TryNumber(string text, out double value) =>
        double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out value) && double.IsFinite(value);

    private static bool TryReadLines(string path, out List<string> lines, out string? error)
    {
        lines = [];
        error = null;
        var info = new FileInfo(path);
        if (!info.Exists)
        {
            error = $"{path}: no such file";
            return false;
        }
        if (info.Length > MaxInputBytes)
        {
            error = $"{path}: {info.Length} bytes, more than the {MaxInputBytes} nbd-plot reads";
            return false;
        }
        foreach (string line in File.ReadLines(path))
        {
            if (lines.Count > MaxRows)
            {
                error = $"{path}: more than {MaxRows} rows";
                return false;
            }
            lines.Add(line.Trim());
        }
        if (lines.Count == 0 || lines[0].Length == 0)
        {
            error = $"{path}: empty (a header line is expected)";
            return false;
        }
        return true;
    }
}
